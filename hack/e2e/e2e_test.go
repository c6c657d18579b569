// Package e2e is KubeDiskGuard's end-to-end test: the real single-node
// cluster of hack/cluster, the built webhook and applier run against it as a
// deployment configures them (hack/kdg, shared with `make demo`), and fio in
// pods measuring what the kernel's block throttle lets through.
//
//	make build test-bins && KUBEBUILDER_ASSETS=$PWD/.cache/bin/k8s-v1.36.3 go test -count=1 -v ./hack/e2e/
//
// One cluster serves each test (TestE2E's subtests) and is torn down at its
// end, on the node kind KDG_NODE names (host, the default, or v2; `make
// test NODE=v2`): every check asks the cluster's Node for what is
// node-local (cgroup directories and limit files, the data disk, processes)
// and never reads the host's paths, so the same checks run on every node
// layout. It holds realtest.HostLock throughout; skipped with -short; under
// CI=true a missing component fails it.
package e2e

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/hack/cluster"
	"github.com/kubediskguard/kubediskguard/hack/kdg"
	"github.com/kubediskguard/kubediskguard/shared/limits"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

const (
	optedIn    = "e2e-on"
	notOptedIn = "e2e-off"
	fioFileMiB = 64
	tolerance  = 0.10
	repoRoot   = "../.."
)

// env is the package's cluster with KubeDiskGuard running on it. A new
// check is a method of env in a file of its own and one line in runChecks;
// its limits and waits come from e.f (figures: they scale with the node
// kind, the checks do not); it makes pods with e.fioPod (or e.c.Pod), waits for limits with
// e.waitCgroup / e.waitCgroupBy (or reads them with e.iopsAre,
// cluster.IOLimits), measures with e.nextRun and checkRun, stops and starts
// KubeDiskGuard through e.g (the guard), and asks e.c.Node for anything on
// the node (e.data for the data disk, cluster.TaskPID and cluster.Signal for
// container processes, Layout() for cgroup paths) — never the host's paths,
// so that it runs on every node kind.
type env struct {
	c   *cluster.Cluster
	dir string // on the host: the cluster's state dir, files given to kubectl
	g   guard
	f   figures // the checks' limits and waits on this node kind
}

// data is a path in the node's data dir (on its data disk), as the
// applier's DATA_MOUNT and pods' hostPath see it.
func (e *env) data(parts ...string) string {
	return path.Join(append([]string{e.c.Node.DataDir()}, parts...)...)
}

// nodeKind is the node kind the tests run on: KDG_NODE (host by default).
func nodeKind(t testing.TB) cluster.NodeKind {
	k, err := cluster.ParseNodeKind(os.Getenv("KDG_NODE"))
	if err != nil {
		t.Fatalf("KDG_NODE: %v", err)
	}
	return k
}

// checkFio: fio, which the pods run from the node's /usr, is on the node.
func (e *env) checkFio(ctx context.Context, t testing.TB) {
	if _, err := e.c.Node.Run(ctx, "fio", "--version"); err != nil {
		realtest.Missing(t, "fio on the node ("+err.Error()+")", "apt-get install fio (make host-deps)")
	}
}

func TestE2E(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a real cluster and measures disk IO; not with -short")
	}
	realtest.Root(t)
	// On the host: one kubelet, no other package's runtimes or kubepods
	// cgroups meanwhile. The v2 node is a VM that touches none of the
	// host's, but it needs the host's cores, as TestV2NodeUpSmokeDown's.
	realtest.HostLock(t)
	e := setUp(t)
	// First, while no other check's pods do IO on the data disk.
	t.Run("NoisyNeighbour", e.testProtection)
	e.runChecks(t)
}

// runChecks runs the checks TestE2E and TestDeployment share, through the
// guard in the field g: the binaries or the deployment.
func (e *env) runChecks(t *testing.T) {
	t.Run("Throttle", e.testThrottle)
	// These three reuse Throttle's pods.
	t.Run("ContainerRestartKeepsLimit", e.testContainerRestart)
	t.Run("AnnotateChangesLimitLive", e.testAnnotateLive)
	t.Run("DataTotalIOPS", e.testDataTotalIOPS)
	// Throttle's pods are not measured after this (ResetClearsEverything
	// reads only their cgroups): their fio loops stop, so that they do not
	// take the node's CPU from the checks after, whose pods start, stop and
	// do IO. On the emulated v2 node every IO is paid by the VM's two vCPUs:
	// with the loops running, its pods took 50–90 s to start and about a
	// minute each to be deleted (CI 2026-12-04).
	stayedPaused := e.pauseFio(t, types.NamespacedName{Namespace: optedIn, Name: "limited"}, types.NamespacedName{Namespace: notOptedIn, Name: "free"})
	t.Run("PolicyReachesRunningPods", e.testPolicyReachesRunningPods)
	t.Run("WebhookDown", e.testWebhookDown)
	t.Run("ApplierCrashLosesNothing", e.testApplierCrash)
	t.Run("BufferedWrites", e.testBufferedWrites)
	t.Run("UnstampedPodReported", e.testUnstampedPod)
	t.Run("ResetClearsEverything", e.testReset)
	stayedPaused(t)
}

func setUp(t testing.TB) *env {
	assets := realtest.KubeAssets(t, "etcd", "kube-apiserver", "kubelet", "kubectl")
	cfg := cluster.Config{Node: nodeKind(t), BinDir: assets, Log: testWriter{t}}
	for _, m := range cfg.Missing() {
		realtest.Missing(t, m, "make host-deps test-bins")
	}
	bin, err := filepath.Abs(filepath.Join(repoRoot, "bin"))
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{"kubediskguard-webhook", "kubediskguard-applier"} {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			realtest.Missing(t, "bin/"+b, "make build")
		}
	}
	// On a disk, not tmpfs: the host node's data disk is a file in it.
	dir, err := os.MkdirTemp("/var/tmp", "kdg-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{dir: dir, f: figuresFor(cfg.Node)}
	cfg.Dir = filepath.Join(dir, "cluster")
	onInterrupt(t, dir, cfg.Dir)
	t.Cleanup(func() { e.tearDown(t) })

	ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(2*time.Minute))
	defer cancel()
	if e.c, err = cluster.Up(ctx, cfg); err != nil {
		t.Fatalf("cluster up: %v", err)
	}
	t.Logf("node %s: %s; data disk %s at %s", e.c.NodeName, e.c.Node.Layout(), e.c.Node.DataDisk(), e.c.Node.DataDir())
	e.checkFio(ctx, t)
	b := &binaries{c: e.c, bin: bin}
	e.g = b
	if b.webhook, err = kdg.StartWebhook(ctx, e.c, filepath.Join(bin, "kubediskguard-webhook")); err != nil {
		t.Fatalf("webhook: %v", err)
	}
	if err := b.webhook.Register(ctx, filepath.Join(repoRoot, "manifests/webhook/mutatingwebhookconfiguration.yaml"), filepath.Join(dir, "mwc.yaml")); err != nil {
		t.Fatalf("registering the webhook: %v", err)
	}
	if err := b.StartApplier(ctx); err != nil {
		t.Fatalf("applier: %v", err)
	}
	if err := e.prepare(ctx); err != nil {
		t.Fatal(err)
	}
	return e
}

// prepare writes the shared fio data file and makes the test namespaces:
// optedIn opted in with a default of e.f.nsIOPS, notOptedIn not.
func (e *env) prepare(ctx context.Context) error {
	if err := cluster.WriteDataFile(ctx, e.c.Node, e.data("read.dat"), fioFileMiB); err != nil {
		return err
	}
	for _, args := range [][]string{
		{"create", "namespace", optedIn},
		{"label", "namespace", optedIn, "kubediskguard.io/enabled=true"},
		{"annotate", "namespace", optedIn, fmt.Sprintf("kubediskguard.io/iops=%d", e.f.nsIOPS)},
		{"create", "namespace", notOptedIn},
	} {
		if _, err := e.c.Kubectl(ctx, args...); err != nil {
			return err
		}
	}
	for _, ns := range []string{optedIn, notOptedIn} {
		if err := e.c.WaitServiceAccount(ctx, ns); err != nil {
			return err
		}
	}
	return nil
}

// onInterrupt backs up tearDown when the test binary gets SIGINT or
// SIGTERM (a Ctrl-C of make test): the cluster in clusterDir is torn down
// (with it the VM, and the binaries the tests started on the node), then dir
// is removed unless mounts are left in it. What a test adds on the host
// (cert-manager) it pushes on the returned Interrupt.
func onInterrupt(t testing.TB, dir, clusterDir string) *realtest.Interrupt {
	in := realtest.OnInterrupt(t, "the e2e cluster in "+clusterDir)
	in.Push(func() {
		if m := cluster.MountsUnder(dir); len(m) > 0 {
			fmt.Fprintf(os.Stderr, "mounts left under %s, not removing it: %v\n", dir, m)
			return
		}
		os.RemoveAll(dir)
	})
	in.Push(func() {
		if err := cluster.Down(clusterDir, os.Stderr); err != nil {
			fmt.Fprintf(os.Stderr, "cluster down: %v\n", err)
		}
	})
	return in
}

func (e *env) tearDown(t testing.TB) {
	if e.g != nil {
		e.g.Close(t)
	}
	if e.c != nil {
		if err := cluster.Down(e.c.Dir, testWriter{t}); err != nil {
			t.Errorf("cluster down: %v", err)
		}
	}
	if m := cluster.MountsUnder(e.dir); len(m) > 0 {
		t.Errorf("mounts left under %s, not removing it: %v", e.dir, m)
		return
	}
	if !t.Failed() {
		os.RemoveAll(e.dir)
		return
	}
	// A failure names the logs (the cluster's, with the node's journals
	// that Down copied there, even when Up failed; the test's own): keep
	// the logs directories, drop the rest.
	clusterDir := filepath.Join(e.dir, "cluster")
	keep := map[string]bool{clusterDir: true, filepath.Join(clusterDir, "logs"): true, filepath.Join(e.dir, "logs"): true}
	for _, d := range []string{e.dir, clusterDir} {
		entries, _ := os.ReadDir(d)
		for _, en := range entries {
			if p := filepath.Join(d, en.Name()); !keep[p] {
				os.RemoveAll(p)
			}
		}
	}
	t.Logf("the logs are kept under %s (remove it when read)", e.dir)
}

// restoreApplier, for t.Cleanup, brings back the applier the other tests
// expect if a test left it stopped, dead or configured otherwise.
func (e *env) restoreApplier(t *testing.T) {
	if e.g.ApplierAsSetUp() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(2*time.Minute))
	defer cancel()
	if err := e.restartApplier(ctx); err != nil {
		t.Error(err)
	}
}

// restartApplier stops the applier and starts it again with settings
// (KEY=VALUE) on top of how it was set up; it returns when it is ready.
func (e *env) restartApplier(ctx context.Context, settings ...string) error {
	if err := e.g.StopApplier(ctx, false); err != nil {
		return fmt.Errorf("stopping the applier: %w", err)
	}
	if err := e.g.StartApplier(ctx, settings...); err != nil {
		return fmt.Errorf("starting the applier with %v: %w", settings, err)
	}
	return nil
}

// deletePods, for t.Cleanup, deletes pods one at a time, each waited for
// until the node has stopped it (cluster.DeletePod), so that the next check
// starts on a node that is not still tearing them down. One at a time: on
// the emulated v2 node, four pods torn down at once starved containerd's
// shims (StopContainer past the kubelet's 2 min deadline, one pod still
// there after 3 min; CI 2026-12-04), so their teardowns do not compete.
func (e *env) deletePods(t *testing.T, pods ...*corev1.Pod) {
	start := time.Now()
	for _, p := range pods {
		ctx, cancel := context.WithTimeout(context.Background(), e.c.PodTimeout())
		if err := e.c.DeletePod(ctx, p.Namespace, p.Name); err != nil {
			t.Errorf("deleting %s/%s: %v", p.Namespace, p.Name, err)
		}
		cancel()
	}
	if len(pods) > 1 {
		t.Logf("%d pods deleted, one at a time, in %s", len(pods), time.Since(start).Round(time.Millisecond))
	}
}

// pod gets a pod an earlier test made.
func (e *env) pod(ctx context.Context, t *testing.T, ns, name string) *corev1.Pod {
	t.Helper()
	p, err := e.c.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("pod %s/%s (made by an earlier test): %v", ns, name, err)
	}
	return p
}

// fioContainer loops fio runs: a 4k random-read job on the shared data file
// and a 4k random-write job on its own file, both O_DIRECT, each run's JSON
// between markers in its log (kdg.FioRuns), until its pause file is in the
// data dir (pauseFio). fio comes from the node.
func (e *env) fioContainer(name, writeFile string) corev1.Container {
	script := fmt.Sprintf(`i=0; while :; do sleep 1; [ -e /data/%s ] && continue; i=$((i+1)); %s --output-format=json --output=/tmp/fio.json; `+
		`echo "=== fio run $i"; cat /tmp/fio.json; echo "=== end of fio run $i"; done`, fioPauseFile(writeFile), e.f.fioCommand(e.f.fioSeconds, writeFile))
	return corev1.Container{
		Name: name, Image: cluster.BusyboxImage, ImagePullPolicy: corev1.PullNever,
		Command: []string{"sh", "-c", script},
		VolumeMounts: []corev1.VolumeMount{
			{Name: "data", MountPath: "/data"},
			{Name: "usr", MountPath: "/usr", ReadOnly: true},
			{Name: "lib", MountPath: "/lib", ReadOnly: true},
			{Name: "lib64", MountPath: "/lib64", ReadOnly: true},
		},
	}
}

// fioCommand is the fio run of a fioContainer, for runtime seconds: the
// random reads of the shared data file and the random writes of writeFile
// (in the data dir), each job at most f.fioRate IOPS when that is set.
func (f figures) fioCommand(runtime int, writeFile string) string {
	rate := ""
	if f.fioRate > 0 {
		rate = fmt.Sprintf("--rate_iops=%d ", f.fioRate)
	}
	return fmt.Sprintf(`/usr/bin/fio --size=%dM --bs=4k --direct=1 --ioengine=libaio --iodepth=8 --runtime=%d --time_based %s`+
		`--name=r --filename=/data/read.dat --rw=randread --name=w --filename=/data/%s --rw=randwrite`, fioFileMiB, runtime, rate, writeFile)
}

// fioWriteFile is the name of the write file of container c of fio pod
// name in namespace ns, in the data dir.
func fioWriteFile(ns, name, c string) string { return fmt.Sprintf("write-%s-%s-%s.dat", ns, name, c) }

// fioPauseFile is the name, in the data dir, of the file whose presence
// stops the fio loop of the container whose write file is writeFile.
func fioPauseFile(writeFile string) string { return writeFile + ".pause" }

// pauseFio stops the fio loops of the named pods' containers (a run under
// way ends at its runtime) by writing their pause files on the node, and
// returns the check, for later, that they stayed stopped: at most the run
// under way was logged after the pause. A pod that is not there (a -run
// that skipped the check making it) has nothing to stop.
func (e *env) pauseFio(t *testing.T, pods ...types.NamespacedName) (stayedPaused func(*testing.T)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(time.Minute))
	defer cancel()
	type loop struct {
		pod       *corev1.Pod
		container string
	}
	var loops []loop
	var files []string
	for _, n := range pods {
		p, err := e.c.Client.CoreV1().Pods(n.Namespace).Get(ctx, n.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			t.Fatalf("pausing the fio loops of %s: %v", n, err)
		}
		for _, c := range p.Spec.Containers {
			loops = append(loops, loop{p, c.Name})
			files = append(files, e.data(fioPauseFile(fioWriteFile(p.Namespace, p.Name, c.Name))))
		}
	}
	if len(files) == 0 {
		return func(*testing.T) {}
	}
	if out, err := e.c.Node.Run(ctx, "touch", files...); err != nil {
		t.Fatalf("pausing fio loops: touch %v on the node: %v: %s", files, err, out)
	}
	before := make([]int, len(loops))
	for i, l := range loops {
		runs, err := kdg.FioRuns(ctx, e.c.Client, l.pod, l.container)
		if err != nil {
			t.Fatalf("pausing fio loops: %v", err)
		}
		before[i] = len(runs)
	}
	t.Logf("fio loops paused: %d containers of %v", len(files), pods)
	return func(t *testing.T) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(time.Minute))
		defer cancel()
		for i, l := range loops {
			runs, err := kdg.FioRuns(ctx, e.c.Client, l.pod, l.container)
			if err != nil {
				t.Errorf("fio loops paused: %v", err)
				continue
			}
			if len(runs) > before[i]+1 {
				t.Errorf("%s/%s %s logged %d fio runs since its loop was paused (%d before), want at most the one under way: its pause file does not stop it",
					l.pod.Namespace, l.pod.Name, l.container, len(runs)-before[i], before[i])
			}
		}
	}
}

// fioPod is a pod of fioContainers on the data disk, their write files
// written on the node (outside any throttled cgroup) first.
func (e *env) fioPod(ns, name string, annotations map[string]string, containers ...string) *corev1.Pod {
	ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(time.Minute))
	defer cancel()
	p := e.c.Pod(ns, name)
	p.Annotations = annotations
	p.Spec.Containers = nil
	for _, c := range containers {
		wf := fioWriteFile(ns, name, c)
		if err := cluster.WriteDataFile(ctx, e.c.Node, e.data(wf), fioFileMiB); err != nil {
			panic(err)
		}
		p.Spec.Containers = append(p.Spec.Containers, e.fioContainer(c, wf))
	}
	hp := func(n, path string) corev1.Volume {
		return corev1.Volume{Name: n, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: path}}}
	}
	p.Spec.Volumes = []corev1.Volume{hp("data", e.data()), hp("usr", "/usr"), hp("lib", "/lib"), hp("lib64", "/lib64")}
	return p
}

// testThrottle: one opted-in pod with a container at the namespace default,
// one with a per-container override and an excluded one (istio-proxy); the
// same workload in a namespace that did not opt in. All run at once.
func (e *env) testThrottle(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(90*time.Second))
	defer cancel()
	limited := e.fioPod(optedIn, "limited", map[string]string{
		"container.kubediskguard.io/db": fmt.Sprintf("read-iops=%d,write-iops=%d", e.f.dbRead, e.f.dbWrite),
	}, "app", "db", "istio-proxy")
	free := e.fioPod(notOptedIn, "free", nil, "app")
	for _, p := range []*corev1.Pod{limited, free} {
		if _, err := e.c.Client.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatalf("creating %s/%s: %v", p.Namespace, p.Name, err)
		}
	}
	var err error
	if limited, err = e.c.WaitRunning(ctx, optedIn, "limited", e.c.PodTimeout()); err != nil {
		t.Fatal(err)
	}
	if free, err = e.c.WaitRunning(ctx, notOptedIn, "free", e.c.PodTimeout()); err != nil {
		t.Fatal(err)
	}
	if a := limited.Annotations["kubediskguard.io/limits"]; a == "" {
		t.Errorf("the opted-in pod has no kubediskguard.io/limits; annotations %v", limited.Annotations)
	} else {
		t.Logf("kubediskguard.io/limits: %s", a)
	}
	if a, ok := free.Annotations["kubediskguard.io/limits"]; ok {
		t.Errorf("the pod in %s (not opted in) got kubediskguard.io/limits: %s", notOptedIn, a)
	}

	type want struct {
		pod         *corev1.Pod
		container   string
		read, write int // 0: not throttled
	}
	cases := []want{
		{limited, "app", e.f.nsIOPS, e.f.nsIOPS},
		{limited, "db", e.f.dbRead, e.f.dbWrite},
		{limited, "istio-proxy", 0, 0},
		{free, "app", 0, 0},
	}
	// The cgroups first: then every fio run that starts later is measured
	// under the final limits.
	var since time.Time
	for _, w := range cases {
		since = e.waitCgroup(ctx, t, w.pod, w.container, w.read, w.write)
	}
	// And the unlimited ones have no IOPS limit anywhere.
	for _, w := range cases {
		if w.read == 0 {
			e.waitCgroup(ctx, t, w.pod, w.container, 0, 0)
		}
	}
	// The limited ones got their limits after their start events (the
	// periodic pass never runs: checkInterval), and the applier logs how
	// long after: the reaction on this node kind.
	applied := appliedLines(e.applierLog(ctx, t))
	for _, w := range cases {
		if w.read == 0 {
			continue
		}
		i := slices.IndexFunc(applied, func(n notice) bool {
			return n.Pod == w.pod.Namespace+"/"+w.pod.Name && n.Container == w.container && n.SinceStartEventMs != nil
		})
		if i < 0 {
			t.Errorf("%s/%s %s: the applier logged no \"IO limits applied\" after a start event (sinceStartEventMs): its limits did not come from the event path", w.pod.Namespace, w.pod.Name, w.container)
			continue
		}
		t.Logf("%s/%s %s: limits written %.1f ms after its start event", w.pod.Namespace, w.pod.Name, w.container, *applied[i].SinceStartEventMs)
	}
	maxLimit := float64(e.f.nsIOPS)
	for _, w := range cases {
		what := fmt.Sprintf("%s/%s %s", w.pod.Namespace, w.pod.Name, w.container)
		if w.read != 0 {
			e.measureLimited(ctx, t, w.pod, w.container, since, what, w.read, w.write)
			continue
		}
		r, err := e.nextRun(ctx, w.pod, w.container, since)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%-28s read %7.1f IOPS (limit %d)  write %7.1f IOPS (limit %d)", what, r.ReadIOPS, w.read, r.WriteIOPS, w.write)
		// Unthrottled: well above any limit in play.
		if r.ReadIOPS < 1.5*maxLimit {
			t.Errorf("%s: %.1f read IOPS: throttled, want > %.0f (not limited)", what, r.ReadIOPS, 1.5*maxLimit)
		}
	}
}

// measureLimited measures the container's first fio run that started after
// since and checks it against its limits (checkRun). A throttle never lets
// less through than its limit: a run below the band (and above it in no
// direction) lost the disk to other work on the host, so it is logged and
// the next run is measured instead, once; a run above the band fails at
// once, as does a second run below it.
func (e *env) measureLimited(ctx context.Context, t *testing.T, pod *corev1.Pod, container string, since time.Time, what string, read, write int) kdg.FioRun {
	t.Helper()
	r, err := e.nextRun(ctx, pod, container, since)
	if err == nil && belowBand(r, read, write) {
		t.Logf("%-28s read %7.1f IOPS  write %7.1f IOPS: below the limits' band (host contention, load %s); measuring the next run", what, r.ReadIOPS, r.WriteIOPS, realtest.LoadAverage())
		r, err = e.nextRun(ctx, pod, container, r.Start.Add(time.Millisecond))
	}
	if err != nil {
		t.Fatal(err)
	}
	checkRun(t, what, r, read, write)
	return r
}

// belowBand reports whether a run fell below the tolerance band of a limit
// in some direction and above it in none.
func belowBand(r kdg.FioRun, read, write int) bool {
	below := func(got float64, limit int) bool { return got < (1-tolerance)*float64(limit) }
	above := func(got float64, limit int) bool { return got > (1+tolerance)*float64(limit) }
	return (below(r.ReadIOPS, read) || below(r.WriteIOPS, write)) && !above(r.ReadIOPS, read) && !above(r.WriteIOPS, write)
}

// checkRun logs a fio run's read and write IOPS and asserts that each is
// within tolerance of its limit.
func checkRun(t *testing.T, what string, r kdg.FioRun, read, write int) {
	t.Helper()
	t.Logf("%-28s read %7.1f IOPS (limit %d)  write %7.1f IOPS (limit %d)", what, r.ReadIOPS, read, r.WriteIOPS, write)
	for _, m := range []struct {
		dir   string
		got   float64
		limit int
	}{{"read", r.ReadIOPS, read}, {"write", r.WriteIOPS, write}} {
		if math.Abs(m.got-float64(m.limit)) > tolerance*float64(m.limit) {
			t.Errorf("%s: %.1f %s IOPS, want %d ± %.0f%%", what, m.got, m.dir, m.limit, tolerance*100)
		}
	}
}

// waitCgroup waits until the container's cgroup limits the node's data
// disk, and only it, to read and write IOPS (0: no IOPS limit on any
// device), and returns when it saw them.
func (e *env) waitCgroup(ctx context.Context, t *testing.T, pod *corev1.Pod, container string, read, write int) time.Time {
	t.Helper()
	return e.waitCgroupBy(ctx, t, time.Now().Add(e.f.slowed(30*time.Second)), pod, container, read, write)
}

// waitCgroupBy is waitCgroup with a deadline.
func (e *env) waitCgroupBy(ctx context.Context, t *testing.T, deadline time.Time, pod *corev1.Pod, container string, read, write int) time.Time {
	t.Helper()
	dir, err := e.c.ContainerCgroup(pod, container)
	if err != nil {
		t.Fatal(err)
	}
	var got string
	if err := cluster.Poll(ctx, "cgroup limits", 100*time.Millisecond, time.Until(deadline), func() error {
		var ok bool
		if got, ok = e.iopsAre(ctx, dir, read, write); !ok {
			return errors.New("not yet")
		}
		return nil
	}); err != nil {
		lctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		log, lerr := e.g.ApplierLog(lctx)
		if lerr != nil {
			log = lerr.Error()
		}
		// The log first: the failure's own line last, where a cut output
		// keeps it.
		t.Logf("the applier's log ends:\n%s", tail(log, 15))
		t.Fatalf("%s/%s %s: cgroup %s limits %s, want read-iops=%d write-iops=%d on the data disk %s only (0: none) by %s (%v)",
			pod.Namespace, pod.Name, container, dir, got, read, write, e.c.Node.DataDisk(), deadline.Format(time.TimeOnly), err)
	}
	return time.Now()
}

// iopsAre reports whether the IOPS limits of the cgroup at dir on the node
// are read and write on the data disk and none elsewhere (read and write
// 0: no IOPS limit at all), with the limits it read (or why it could not).
func (e *env) iopsAre(ctx context.Context, dir string, read, write int) (string, bool) {
	got, err := cluster.IOLimits(ctx, e.c.Node, dir)
	if err != nil {
		return err.Error(), false
	}
	iops := map[device.Device]limits.Limits{}
	for d, l := range got {
		if l.ReadIOPS != 0 || l.WriteIOPS != 0 {
			iops[d] = limits.Limits{ReadIOPS: l.ReadIOPS, WriteIOPS: l.WriteIOPS}
		}
	}
	want := map[device.Device]limits.Limits{}
	if read != 0 || write != 0 {
		want[e.c.Node.DataDisk()] = limits.Limits{ReadIOPS: uint64(read), WriteIOPS: uint64(write)}
	}
	return cluster.FormatIOLimits(got), maps.Equal(iops, want)
}

// nextRun waits for the container's first fio run that started after since.
func (e *env) nextRun(ctx context.Context, pod *corev1.Pod, container string, since time.Time) (kdg.FioRun, error) {
	return kdg.NextRun(ctx, e.c.Client, pod, container, since, e.f.slowed(time.Duration(3*(e.f.fioSeconds+2))*time.Second))
}

// testWebhookDown: with the webhook stopped, the apiserver refuses pods in
// the opted-in namespace (failurePolicy Fail) and still admits them
// elsewhere; once it is back, opted-in pods are admitted with limits.
func (e *env) testWebhookDown(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(3*time.Minute))
	defer cancel()
	pods := e.c.Client.CoreV1()
	if err := e.g.StopWebhook(ctx); err != nil {
		t.Fatalf("stopping the webhook: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(2*time.Minute))
		defer cancel()
		if err := e.g.StartWebhook(ctx); err != nil {
			t.Errorf("restarting the webhook: %v", err)
		}
	})
	refused := e.c.Pod(optedIn, "while-down", "sleep", "inf")
	admitted := e.c.Pod(notOptedIn, "while-down", "sleep", "inf")
	after := e.c.Pod(optedIn, "after-restart", "sleep", "inf")
	// Its pods are gone before the next check starts its own: their
	// starts and teardowns are not to run beside the applier crash's.
	// (refused too, should it have been admitted.)
	t.Cleanup(func() { e.deletePods(t, refused, admitted, after) })

	_, err := pods.Pods(optedIn).Create(ctx, refused, metav1.CreateOptions{})
	if err == nil {
		t.Errorf("pod created in %s with the webhook down; want it refused", optedIn)
	} else {
		t.Logf("refused as expected: %v", err)
		msg := err.Error()
		for _, s := range []string{"pods.kubediskguard.io", "failed calling webhook"} {
			if !strings.Contains(msg, s) {
				t.Errorf("the refusal does not say %q: %v", s, err)
			}
		}
	}
	if _, err := pods.Pods(notOptedIn).Create(ctx, admitted, metav1.CreateOptions{}); err != nil {
		t.Errorf("pod in %s (not opted in) refused with the webhook down: %v", notOptedIn, err)
	}

	if err := e.g.StartWebhook(ctx); err != nil {
		t.Fatalf("restarting the webhook: %v", err)
	}
	var p *corev1.Pod
	if err := cluster.Poll(ctx, "creating a pod", 200*time.Millisecond, e.f.slowed(15*time.Second), func() (err error) {
		p, err = pods.Pods(optedIn).Create(ctx, after, metav1.CreateOptions{})
		return err
	}); err != nil {
		t.Fatalf("pod in %s refused after the webhook came back: %v", optedIn, err)
	}
	if p.Annotations["kubediskguard.io/limits"] == "" {
		t.Errorf("pod admitted after the restart has no kubediskguard.io/limits: %v", p.Annotations)
	}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}
