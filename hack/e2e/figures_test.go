package e2e

import (
	"time"

	"github.com/kubediskguard/kubediskguard/hack/cluster"
)

// figures are the checks' numbers on a node kind: the limits they set and
// measure, how long fio runs and how much longer than on the host their
// waits may take. The checks are one set on every node kind; only these
// scale. The host's data disk (a loop file on the host's disk) does
// thousands of IOPS; the v2 node's (a virtio disk of a VM under software
// emulation) some hundreds per fio job (measured unthrottled beside
// Throttle's other pods: 470–700 read, 320–590 write), and each kubectl
// call or pod start there takes seconds.
type figures struct {
	nsIOPS     int    // optedIn's default, kubediskguard.io/iops
	dbRead     int    // container.kubediskguard.io/db
	dbWrite    int    //
	liveRead   int    // kubediskguard.io/read-iops annotated on a running pod
	totalIOPS  int    // DATA_TOTAL_IOPS of testDataTotalIOPS
	crashWrite [3]int // ApplierCrash's sleeping pods' kubediskguard.io/write-iops
	crashFio   int    // ApplierCrash's fio pod's kubediskguard.io/iops
	policyIOPS int    // PolicyReachesRunningPods: kubediskguard.io/iops, there before the opt-in
	policyRead int    // kubediskguard.io/read-iops, annotated once opted in
	policyMax  int    // kubediskguard.io/max-iops, annotated last
	fioSeconds int    // each fio run's runtime
	fioRate    int    // each fio job's own IOPS ceiling (fio's rate_iops); 0: none
	kind       cluster.NodeKind
}

// slowed is d scaled to the node kind: the time a wait may take there.
func (f figures) slowed(d time.Duration) time.Duration { return cluster.Slowed(f.kind, d) }

// figuresFor is the figures of a node kind.
func figuresFor(k cluster.NodeKind) figures {
	if k == cluster.V2Node {
		// Multiples of 10: the VM's kernel (6.1) grants IOPS by throttle
		// slice, 1/10 s, whole IOs each: a limit of 12 let 10 through and
		// one of 8 let 5 (measured), which the checks would take for a
		// wrong limit.
		return figures{
			nsIOPS: 50, dbRead: 30, dbWrite: 20, liveRead: 80, totalIOPS: 150,
			crashWrite: [3]int{20, 30, 40}, crashFio: 40,
			policyIOPS: 40, policyRead: 70, policyMax: 30,
			fioSeconds: 8, kind: k,
			// Far above every limit in play (at least twice the
			// highest, liveRead, and above the node cap), so the
			// unlimited containers (free's app, the excluded
			// istio-proxy) still measure as unlimited. Without it each
			// of their jobs did 320–820 IOPS (measured) all through the
			// checks, every IO of the emulated disk at the cost of the
			// VM's 2 vCPUs; in a run with them, later pods took ~2 min
			// to start and containerd's task deletes ran past their
			// deadlines for minutes.
			fioRate: 200,
		}
	}
	return figures{
		nsIOPS: 200, dbRead: 100, dbWrite: 50, liveRead: 300, totalIOPS: 500,
		crashWrite: [3]int{110, 120, 130}, crashFio: 150,
		policyIOPS: 150, policyRead: 250, policyMax: 100,
		fioSeconds: 4, kind: k,
	}
}
