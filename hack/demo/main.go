// Command demo is `make demo`: KubeDiskGuard end to end on a real
// single-node Kubernetes on this machine, told as a short story in the
// terminal.
//
//  1. a namespace opts in (kubediskguard.io/enabled=true) with a default of
//     200 IOPS;
//  2. a pod running fio on the data disk is limited to what the webhook
//     stamped on it, the same pod in a namespace that did not opt in is not;
//  3. `kubectl annotate` changes the running pod's limit, and the next fio
//     run shows it;
//  4. `kubectl describe pod` shows the Event the applier recorded;
//  5. a noisy neighbour: a victim pod's read latency alone, next to an
//     unlimited aggressor, and after the aggressor's namespace opts in
//     while it runs (hack/protect), as a bar chart.
//
// It brings up the cluster of hack/cluster (etcd, kube-apiserver, containerd,
// kubelet) on the node kind -node names (this host by default), runs the
// built binaries bin/kubediskguard-webhook and bin/kubediskguard-applier on
// its node as a deployment would configure them (the apiserver calls the
// webhook over TLS; the applier watches containerd and limits the node's
// data disk, mounted at DATA_MOUNT), and tears everything down on exit, on
// Ctrl-C and on failure. Everything node-local (cgroup files, the data disk,
// the binaries' processes) is asked of the cluster's Node. All its files
// live in -dir (removed at the end); the logs of the last run are kept in
// -logs, inside the repository.
//
// Run it with `make demo` (which installs and builds what it needs first), or
// `go run ./hack/demo` with KUBEBUILDER_ASSETS set and `make build` done.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubediskguard/kubediskguard/hack/cluster"
	"github.com/kubediskguard/kubediskguard/hack/kdg"
	"github.com/kubediskguard/kubediskguard/hack/protect"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// The story's settings.
const (
	optedIn    = "demo" // the namespace that opts in
	notOptedIn = "free" // the namespace that does not
	podName    = "fio"
	nsIOPS     = 200 // the opted-in namespace's default (kubediskguard.io/iops)
	liveIOPS   = 100 // the pod's new read limit (kubediskguard.io/read-iops)
	fioSeconds = 8
	fioFileMiB = 128
	// The noisy neighbour (act 5).
	victimNS        = "latency"
	aggressorNS     = "noisy"
	aggressorIOPS   = 200              // the aggressor's namespace default once it opts in
	neighbourFioS   = 6                // the victim's fio run per phase
	neighbourSettle = 10 * time.Second // a pause after the unlimited aggressor
)

func main() {
	dir := flag.String("dir", "/var/tmp/kdg-demo", "state dir: the cluster (with the host node's data disk image), certificates, logs; removed at exit")
	node := flag.String("node", "host", "the node kind: host (this machine: cgroup v1, cgroupfs, containerd 1.6) or v2 (a qemu VM: cgroup v2, systemd, containerd 2.x)")
	binDir := flag.String("bin", "bin", "where kubediskguard-webhook and kubediskguard-applier are (make build)")
	manifest := flag.String("manifest", "manifests/webhook/mutatingwebhookconfiguration.yaml", "the webhook configuration to register")
	logs := flag.String("logs", ".cache/demo/last-run", "where the logs of the run are copied before -dir is removed")
	flag.Parse()

	d := &demo{out: os.Stdout}
	var err error
	if d.dir, err = filepath.Abs(*dir); err == nil {
		if d.binDir, err = filepath.Abs(*binDir); err == nil {
			d.logsDir, err = filepath.Abs(*logs)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(2)
	}
	d.manifest = *manifest
	if d.node, err = cluster.ParseNodeKind(*node); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(2)
	}

	// The first Ctrl-C (or SIGTERM) cancels the story; the teardown then
	// runs to its end, so further ones are only acknowledged.
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		for s := range sigs {
			if ctx.Err() == nil {
				fmt.Fprintf(os.Stderr, "\ndemo: %v: stopping and cleaning up (a few seconds)…\n", s)
				cancel()
			} else {
				fmt.Fprintln(os.Stderr, "demo: still cleaning up; please wait")
			}
		}
	}()

	runErr := d.run(ctx)
	if runErr != nil && ctx.Err() == nil {
		fmt.Fprintf(os.Stderr, "\ndemo failed: %v\n", runErr)
	}
	cleanErr := d.cleanup()
	if cleanErr != nil {
		fmt.Fprintf(os.Stderr, "demo: cleanup: %v\n", cleanErr)
	}
	switch {
	case runErr != nil && ctx.Err() != nil:
		fmt.Fprintln(os.Stderr, "demo: interrupted; everything stopped and removed")
		os.Exit(130)
	case runErr != nil || cleanErr != nil:
		fmt.Fprintf(os.Stderr, "demo: logs of this run: %s\n", d.logsDir)
		os.Exit(1)
	}
	fmt.Printf("Done: nothing left running, %s removed. Logs of this run: %s\n", d.dir, d.logsDir)
}

type demo struct {
	out                            io.Writer
	dir, binDir, logsDir, manifest string
	node                           cluster.NodeKind

	c    *cluster.Cluster // its Down stops the binaries started on its node too
	rows []row
}

// row is one line of the final table.
type row struct{ what, limit, measured string }

func (d *demo) path(parts ...string) string {
	return filepath.Join(append([]string{d.dir}, parts...)...)
}

func (d *demo) clusterDir() string { return d.path("cluster") }

// dataDir is the node's data dir (on its data disk).
func (d *demo) dataDir() string { return d.c.Node.DataDir() }

// step prints a progress line.
func (d *demo) step(format string, args ...any) {
	fmt.Fprintf(d.out, "==> "+format+"\n", args...)
}

func (d *demo) say(format string, args ...any) {
	fmt.Fprintf(d.out, format+"\n", args...)
}

func (d *demo) run(ctx context.Context) error {
	start := time.Now()
	for _, b := range []string{"kubediskguard-webhook", "kubediskguard-applier"} {
		if _, err := os.Stat(filepath.Join(d.binDir, b)); err != nil {
			return fmt.Errorf("%s not built: run `make build` (%w)", b, err)
		}
	}
	if err := d.recover(); err != nil {
		return err
	}
	if err := os.MkdirAll(d.dir, 0o755); err != nil {
		return err
	}

	d.step("starting a single-node Kubernetes (etcd, kube-apiserver, containerd, kubelet) on the %s node; state in %s", d.node, d.clusterDir())
	c, err := cluster.Up(ctx, cluster.Config{Node: d.node, Dir: d.clusterDir(), Log: prefixWriter{d.out, "    "}})
	if err != nil {
		return fmt.Errorf("starting the cluster: %w", err)
	}
	d.c = c
	d.say("    node %s: %s; data disk %s mounted at %s", c.NodeName, c.Node.Layout(), c.Node.DataDisk(), c.Node.DataDir())

	if err := d.startWebhook(ctx); err != nil {
		return err
	}
	if err := d.startApplier(ctx); err != nil {
		return err
	}
	if err := d.prepareFioFile(ctx); err != nil {
		return err
	}
	d.say("\nReady in %s. kubectl below is %s --kubeconfig %s\n",
		time.Since(start).Round(time.Second), filepath.Join(c.BinDir, "kubectl"), c.Kubeconfig)

	if err := d.story(ctx); err != nil {
		return err
	}
	if err := d.noisyNeighbour(ctx); err != nil {
		return err
	}
	d.table()
	return nil
}

// story is what the user came for.
func (d *demo) story(ctx context.Context) error {
	d.say("──── 1. A namespace opts in, with a default of %d IOPS per container ────", nsIOPS)
	for _, args := range [][]string{
		{"create", "namespace", optedIn},
		{"label", "namespace", optedIn, "kubediskguard.io/enabled=true"},
		{"annotate", "namespace", optedIn, "kubediskguard.io/iops=" + strconv.Itoa(nsIOPS)},
		{"create", "namespace", notOptedIn},
	} {
		if _, err := d.kubectl(ctx, args...); err != nil {
			return err
		}
	}
	for _, ns := range []string{optedIn, notOptedIn} {
		if err := d.c.WaitServiceAccount(ctx, ns); err != nil {
			return err
		}
	}

	d.say("\n──── 2. A pod runs fio on the data disk (%s) ────", d.dataDir())
	d.say("It loops: fio 4k random reads, O_DIRECT, libaio, iodepth 16, %d s, then a 2 s pause; the IOPS come from fio's JSON output in the pod's log.", fioSeconds)
	for _, ns := range []string{optedIn, notOptedIn} {
		f := d.path("fio-" + ns + ".yaml")
		if err := os.WriteFile(f, []byte(d.fioPod(ns)), 0o644); err != nil {
			return err
		}
		if ns == optedIn {
			d.say("\n%s:\n%s", f, indent(d.fioPod(ns), "    "))
		}
		if _, err := d.kubectl(ctx, "create", "-f", f); err != nil {
			return err
		}
	}
	limited, err := d.c.WaitRunning(ctx, optedIn, podName, d.c.PodTimeout())
	if err != nil {
		return err
	}
	free, err := d.c.WaitRunning(ctx, notOptedIn, podName, d.c.PodTimeout())
	if err != nil {
		return err
	}
	d.say("\nThe webhook stamped the resolved limits on the pod in %q (0 = unlimited):", optedIn)
	if _, err := d.kubectl(ctx, "get", "pod", "-n", optedIn, podName, "-o", `jsonpath={.metadata.annotations.kubediskguard\.io/limits}{"\n"}`); err != nil {
		return err
	}
	d.say("and nothing on the pod in %q, which did not opt in:", notOptedIn)
	out, err := d.kubectl(ctx, "get", "pod", "-n", notOptedIn, podName, "-o", `jsonpath={.metadata.annotations}{"\n"}`)
	if err != nil {
		return err
	}
	if strings.Contains(string(out), "kubediskguard.io/limits") {
		return fmt.Errorf("the pod in %s got limits: %s", notOptedIn, out)
	}
	if strings.TrimSpace(string(out)) == "" {
		d.say("    (no annotations)")
	}

	d.say("\nThe applier wrote them into the container's cgroup, for the data disk mounted at %s (%s):", d.dataDir(), d.disk())
	lim, err := d.limitedRun(ctx, limited, nsIOPS)
	if err != nil {
		return err
	}
	d.say("\n  %s/%s  fio: %8.1f read IOPS   (limit %d)", optedIn, podName, lim.ReadIOPS, nsIOPS)
	freeStart := containerStarted(free)
	fr, err := d.nextRun(ctx, free, freeStart)
	if err != nil {
		return err
	}
	d.say("  %s/%s  fio: %8.1f read IOPS   (no limit: namespace %q is not opted in)", notOptedIn, podName, fr.ReadIOPS, notOptedIn)
	d.rows = append(d.rows,
		row{fmt.Sprintf("pod in %q (namespace default iops=%d)", optedIn, nsIOPS), fmt.Sprintf("%d read IOPS", nsIOPS), fmt.Sprintf("%.1f", lim.ReadIOPS)},
		row{fmt.Sprintf("same pod in %q (not opted in)", notOptedIn), "none", fmt.Sprintf("%.0f", fr.ReadIOPS)})
	if _, err := d.kubectl(ctx, "delete", "pod", "-n", notOptedIn, podName, "--wait=false"); err != nil {
		return err
	}

	d.say("\n──── 3. Change the running pod's limit with kubectl annotate ────")
	if _, err := d.kubectl(ctx, "annotate", "pod", "-n", optedIn, podName, "kubediskguard.io/read-iops="+strconv.Itoa(liveIOPS)); err != nil {
		return err
	}
	d.say("The webhook resolved the pod again on this update:")
	if _, err := d.kubectl(ctx, "get", "pod", "-n", optedIn, podName, "-o", `jsonpath={.metadata.annotations.kubediskguard\.io/limits}{"\n"}`); err != nil {
		return err
	}
	d.say("and the applier changed the running container's cgroup:")
	live, err := d.limitedRun(ctx, limited, liveIOPS)
	if err != nil {
		return err
	}
	d.say("\n  %s/%s  next fio run: %8.1f read IOPS   (limit %d, same container, no restart)", optedIn, podName, live.ReadIOPS, liveIOPS)
	d.rows = append(d.rows, row{fmt.Sprintf("same running pod after read-iops=%d", liveIOPS), fmt.Sprintf("%d read IOPS", liveIOPS), fmt.Sprintf("%.1f", live.ReadIOPS)})

	d.say("\n──── 4. The applier records what it did as Events on the pod ────")
	if err := d.waitEvents(ctx, 2); err != nil {
		return err
	}
	out, err = d.c.Kubectl(ctx, "describe", "pod", "-n", optedIn, podName)
	if err != nil {
		return err
	}
	d.say("$ kubectl describe pod -n %s %s    (showing Name, Annotations and Events)", optedIn, podName)
	d.say("%s", indent(describeExcerpt(string(out)), "    "))
	return nil
}

// noisyNeighbour is act 5: why KubeDiskGuard exists, measured. A victim
// pod reads with fio at iodepth 1 (latency-sensitive) alone, next to an
// aggressor pod hammering the same disk from a namespace that did not opt
// in, and again once that namespace opts in while the aggressor runs.
func (d *demo) noisyNeighbour(ctx context.Context) error {
	d.say("\n──── 5. A noisy neighbour ────")
	d.say("A victim pod does 4k random reads, O_DIRECT, iodepth 1 (a latency-sensitive service), %d s per phase;", neighbourFioS)
	d.say("an aggressor pod in namespace %q does 4k random reads and writes, 4 jobs at iodepth 32, on the same disk.", aggressorNS)
	d.say("fio runs inside the pods (kubectl exec); the latencies are fio's completion latencies.")
	// The earlier acts' pod would be a neighbour too.
	if _, err := d.kubectl(ctx, "delete", "pod", "-n", optedIn, podName, "--wait=false"); err != nil {
		return err
	}
	if err := d.c.SetDataDiskDirectIO(ctx, true); err != nil {
		return err
	}
	if d.c.State.DataDisk != nil && d.c.State.DataDisk.Loop != "" {
		d.say("    (the data disk's loop device now does direct IO, so that reads reach the host's disk, not its page cache)")
	}
	s := &protect.Setup{C: d.c, VictimNS: victimNS, AggressorNS: aggressorNS, Limit: aggressorIOPS, Seconds: neighbourFioS,
		VictimMiB: 128, AggressorMiB: 256, Log: func(f string, a ...any) { d.say("    "+f, a...) }}
	d.step("writing the pods' files and starting the victim and the aggressor (sleeping until fio is exec'd)")
	if err := s.Prepare(ctx); err != nil {
		return err
	}
	var rs []protect.Result
	for _, ph := range protect.Phases {
		switch ph {
		case protect.Alone:
			d.say("\nThe victim alone:")
		case protect.Unprotected:
			d.say("\nWith the aggressor, whose namespace %q did not opt in (no limit):", aggressorNS)
		case protect.Protected:
			d.say("\nThe aggressor's namespace opts in while it runs (its default, kubediskguard.io/iops=%d, was set already):", aggressorIOPS)
			d.say("$ kubectl label namespace %s kubediskguard.io/enabled=true", aggressorNS)
		}
		r, err := s.Run(ctx, ph)
		if err != nil {
			return err
		}
		rs = append(rs, r)
		if ph == protect.Unprotected {
			// The unlimited aggressor's writes keep the host's disk busy
			// for a while after it stopped (see protect.Setup.Settle).
			d.say("    (letting the host's disk settle for %s after the unlimited aggressor)", neighbourSettle)
			select {
			case <-time.After(neighbourSettle):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	sum := protect.Summarize(rs)
	d.say("\nThe victim's p99 read latency:\n%s", protect.Bars(sum, 40))
	for _, ph := range protect.Phases {
		r := sum[ph]
		what := map[protect.Phase]string{
			protect.Alone:       "victim alone",
			protect.Unprotected: fmt.Sprintf("victim + aggressor in %q (not opted in)", aggressorNS),
			protect.Protected:   fmt.Sprintf("victim + aggressor after %q opts in (live)", aggressorNS),
		}[ph]
		aggr := "-"
		if ph != protect.Alone {
			aggr = fmt.Sprintf("aggressor %.0f r + %.0f w IOPS", r.AggressorReadIOPS, r.AggressorWriteIOPS)
		}
		limit := "none"
		if ph == protect.Protected {
			limit = fmt.Sprintf("aggressor %d IOPS", aggressorIOPS)
		}
		d.rows = append(d.rows, row{what, limit, fmt.Sprintf("victim %.0f, p99 %s (%.1fx alone); %s", r.VictimIOPS, r.P99.Round(10*time.Microsecond), sum.Ratio(ph), aggr)})
	}
	return nil
}

func (d *demo) table() {
	d.say("\n──── Summary: fio 4k random reads, O_DIRECT, on disk %s (acts 2–3: iodepth 16, %d s; act 5: the victim at iodepth 1, %d s) ────\n", d.disk(), fioSeconds, neighbourFioS)
	tw := tabwriter.NewWriter(d.out, 0, 0, 3, ' ', 0)
	fmt.Fprintln(tw, "case\tlimit\tmeasured (read IOPS)")
	fmt.Fprintln(tw, "----\t-----\t--------------------")
	for _, r := range d.rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", r.what, r.limit, r.measured)
	}
	tw.Flush()
	d.say("")
}

// kubectl runs kubectl as the user would, printing the command and its output.
func (d *demo) kubectl(ctx context.Context, args ...string) ([]byte, error) {
	quoted := make([]string, len(args))
	for i, a := range args {
		quoted[i] = a
		if strings.ContainsAny(a, ` {}"\'`) {
			quoted[i] = "'" + a + "'"
		}
	}
	d.say("$ kubectl %s", strings.Join(quoted, " "))
	out, err := d.c.Kubectl(ctx, args...)
	if s := strings.TrimRight(string(out), "\n"); s != "" && err == nil {
		d.say("%s", indent(s, "    "))
	}
	return out, err
}

// fioPod is the workload: busybox (the cluster's local image) looping fio
// runs. fio and its libraries come from the node, read-only: the local
// cluster has no registry, and the node's fio is what REAL-COMPONENTS.md
// measured.
func (d *demo) fioPod(ns string) string {
	script := fmt.Sprintf(`i=0; while :; do i=$((i+1)); sleep 2; `+
		`/usr/bin/fio --name=randread --filename=/data/fio.dat --readonly --size=%dM --rw=randread --bs=4k --direct=1 --ioengine=libaio --iodepth=16 --runtime=%d --time_based --output-format=json --output=/tmp/fio.json; `+
		`echo "=== fio run $i"; cat /tmp/fio.json; echo "=== end of fio run $i"; done`, fioFileMiB, fioSeconds)
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %[1]s
  namespace: %[2]s
spec:
  nodeName: %[3]s              # the one node (no scheduler needed)
  hostNetwork: %[4]t
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: fio
    image: %[5]s
    imagePullPolicy: Never
    command: [sh, -c, %[6]q]
    volumeMounts:
    - {name: data, mountPath: /data}
    - {name: host-usr, mountPath: /usr, readOnly: true}       # fio and its libraries, from the node
    - {name: host-lib, mountPath: /lib, readOnly: true}
    - {name: host-lib64, mountPath: /lib64, readOnly: true}
  volumes:
  - {name: data, hostPath: {path: %[7]s, type: Directory}}  # on the data disk (DATA_MOUNT)
  - {name: host-usr, hostPath: {path: /usr}}
  - {name: host-lib, hostPath: {path: /lib}}
  - {name: host-lib64, hostPath: {path: /lib64}}
`, podName, ns, d.c.NodeName, !d.c.PodNetwork, cluster.BusyboxImage, script, d.dataDir())
}

// prepareFioFile writes the file fio reads, on the node outside any
// throttled cgroup, with real blocks.
func (d *demo) prepareFioFile(ctx context.Context) error {
	f := path.Join(d.dataDir(), "fio.dat")
	d.step("writing the %d MiB file fio reads, %s", fioFileMiB, f)
	return cluster.WriteDataFile(ctx, d.c.Node, f, fioFileMiB)
}

// disk is the device number of the node's data disk (what the applier
// limits).
func (d *demo) disk() string { return d.c.Node.DataDisk().String() }

// waitCgroup waits until the pod's container has want as its read IOPS
// limit on the data disk in its cgroup, prints the file that holds it (v1
// blkio.throttle.read_iops_device, v2 io.max), and returns when it saw it.
func (d *demo) waitCgroup(ctx context.Context, pod *corev1.Pod, want uint64) (time.Time, error) {
	dir, err := d.c.ContainerCgroup(pod, "fio")
	if err != nil {
		return time.Time{}, err
	}
	file := path.Join(dir, d.c.Node.Layout().LimitFile(limits.ReadIOPS))
	if err := cluster.Poll(ctx, file, 100*time.Millisecond, 30*time.Second, func() error {
		got, err := cluster.IOLimits(ctx, d.c.Node, dir)
		if err != nil {
			return err
		}
		if got[d.c.Node.DataDisk()].ReadIOPS != want {
			return fmt.Errorf("limits %s, want read-iops=%d on %s", cluster.FormatIOLimits(got), want, d.disk())
		}
		return nil
	}); err != nil {
		return time.Time{}, fmt.Errorf("%w: see the applier's log", err)
	}
	b, err := d.c.Node.ReadFile(ctx, file)
	if err != nil {
		return time.Time{}, err
	}
	d.say("$ cat %s\n%s", file, indent(string(b), "    "))
	return time.Now(), nil
}

// nextRun waits for the first fio run of pod that started after since, and
// returns it. It prints a progress line while it waits.
func (d *demo) nextRun(ctx context.Context, pod *corev1.Pod, since time.Time) (kdg.FioRun, error) {
	fmt.Fprintf(d.out, "    waiting for a fio run in %s/%s that started after %s ", pod.Namespace, pod.Name, since.Format("15:04:05.0"))
	defer fmt.Fprintln(d.out)
	done := make(chan struct{})
	ticked := make(chan struct{})
	go func() {
		defer close(ticked)
		for {
			select {
			case <-done:
				return
			case <-time.After(time.Second):
				fmt.Fprint(d.out, ".")
			}
		}
	}()
	r, err := kdg.NextRun(ctx, d.c.Client, pod, "fio", since, 3*(fioSeconds+5)*time.Second)
	close(done)
	<-ticked
	if err != nil {
		return r, fmt.Errorf("%w (`kubectl logs` it)", err)
	}
	fmt.Fprintf(d.out, " run %d", r.N)
	return r, nil
}

// limitedRun waits until the applier has written read IOPS limit iops into
// the pod's cgroup, then for the first fio run that started after, and
// returns it.
func (d *demo) limitedRun(ctx context.Context, pod *corev1.Pod, iops int) (kdg.FioRun, error) {
	applied, err := d.waitCgroup(ctx, pod, uint64(iops))
	if err != nil {
		return kdg.FioRun{}, err
	}
	return d.nextRun(ctx, pod, applied)
}

func containerStarted(p *corev1.Pod) time.Time {
	for _, cs := range p.Status.ContainerStatuses {
		if cs.State.Running != nil {
			return cs.State.Running.StartedAt.Time
		}
	}
	return time.Time{}
}

// waitEvents waits until the applier has recorded n IOLimitsApplied Events
// on the opted-in pod (the Event recorder sends them asynchronously).
func (d *demo) waitEvents(ctx context.Context, n int) error {
	return cluster.Poll(ctx, fmt.Sprintf("%d IOLimitsApplied Events on %s/%s", n, optedIn, podName), 200*time.Millisecond, 20*time.Second, func() error {
		evs, err := d.c.Client.CoreV1().Events(optedIn).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + podName + ",reason=IOLimitsApplied"})
		if err != nil {
			return err
		}
		count := 0
		for _, e := range evs.Items {
			count += max(int(e.Count), 1)
		}
		if count < n {
			return fmt.Errorf("%d so far", count)
		}
		return nil
	})
}

// describeExcerpt keeps the Name, Namespace and Annotations lines and the
// Events section of `kubectl describe pod`.
func describeExcerpt(s string) string {
	var out []string
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	inAnn := false
	for i, l := range lines {
		switch {
		case strings.HasPrefix(l, "Name:"), strings.HasPrefix(l, "Namespace:"):
			out = append(out, l)
		case strings.HasPrefix(l, "Annotations:"):
			out = append(out, l)
			inAnn = true
		case inAnn && strings.HasPrefix(l, " "):
			out = append(out, l)
		case strings.HasPrefix(l, "Events:"):
			out = append(out, "[…]")
			return strings.Join(append(out, lines[i:]...), "\n")
		default:
			inAnn = false
		}
	}
	return strings.Join(out, "\n")
}

// ---- KubeDiskGuard's two binaries ----

// startWebhook serves the webhook on the node on a free loopback port with
// a certificate signed by the cluster CA, and registers the shipped
// MutatingWebhookConfiguration with its clientConfig pointed at it (the
// host node of the demo runs no kube-proxy to reach a Service). See hack/kdg.
func (d *demo) startWebhook(ctx context.Context) error {
	d.step("starting kubediskguard-webhook")
	w, err := kdg.StartWebhook(ctx, d.c, filepath.Join(d.binDir, "kubediskguard-webhook"))
	if err != nil {
		return err
	}
	d.say("    kubediskguard-webhook ready (pid %d on the node, log %s)", w.Proc.PID, w.Log)
	d.say("    registering %s with clientConfig.url %s and the cluster CA as caBundle", d.manifest, w.URL)
	return w.Register(ctx, d.manifest, d.path("mutatingwebhookconfiguration.yaml"))
}

// startApplier runs the applier on the node as the DaemonSet would: this
// node, the node's containerd, the data disk's mount.
func (d *demo) startApplier(ctx context.Context) error {
	d.step("starting kubediskguard-applier (DATA_MOUNT=%s)", d.dataDir())
	p, err := kdg.StartApplier(ctx, d.c, filepath.Join(d.binDir, "kubediskguard-applier"), "kubediskguard-applier", "CHECK_INTERVAL=5")
	if err != nil {
		return err
	}
	d.say("    kubediskguard-applier ready (pid %d on the node, log %s)", p.Proc.PID, p.Log)
	return nil
}

// ---- teardown ----

// cleanup tears the cluster down (which stops the binaries on its node and
// undoes its host changes), keeps the logs and removes the state dir.
func (d *demo) cleanup() error {
	var errs []error
	if d.c != nil {
		d.step("cleaning up: stopping KubeDiskGuard and the cluster, removing %s", d.dir)
	}
	if _, err := os.Stat(filepath.Join(d.clusterDir(), "state.json")); err == nil {
		if err := cluster.Down(d.clusterDir(), prefixWriter{d.out, "    "}); err != nil {
			errs = append(errs, fmt.Errorf("cluster teardown: %w", err))
		}
	}
	if err := d.keepLogs(); err != nil {
		errs = append(errs, fmt.Errorf("keeping the logs: %w", err))
	}
	if m := cluster.MountsUnder(d.dir); len(m) > 0 {
		errs = append(errs, fmt.Errorf("mounts left under %s, not removing it: %v", d.dir, m))
	} else if err := removeOwnDir(d.dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// recover cleans up after an earlier run that was killed before it could
// (the cluster's state file records the binaries it started on the node).
func (d *demo) recover() error {
	if _, err := os.Stat(filepath.Join(d.clusterDir(), "state.json")); err == nil {
		d.step("tearing down the cluster an earlier run left in %s", d.clusterDir())
		if err := cluster.Down(d.clusterDir(), prefixWriter{d.out, "    "}); err != nil {
			return fmt.Errorf("tearing down the earlier cluster: %w", err)
		}
	}
	if m := cluster.MountsUnder(d.dir); len(m) > 0 {
		return fmt.Errorf("mounts left under %s (%v): unmount them first", d.dir, m)
	}
	return removeOwnDir(d.dir)
}

// ownEntries are the names the demo writes in its state dir (and, "data",
// "logs", "webhook-certs" and "procs.json", wrote before the node seam).
var ownEntries = map[string]bool{
	"cluster": true, "data": true, "logs": true, "webhook-certs": true, "procs.json": true,
	"fio-" + optedIn + ".yaml": true, "fio-" + notOptedIn + ".yaml": true, "mutatingwebhookconfiguration.yaml": true,
}

// removeOwnDir removes the state dir, refusing one holding anything the demo
// did not write (a mistyped -dir).
func removeOwnDir(dir string) error {
	if err := cluster.EmptyOwnedDir(dir, ownEntries, "the demo"); err != nil {
		return err
	}
	return os.RemoveAll(dir)
}

// keepLogs copies the run's logs (the binaries' and the cluster's) into
// d.logsDir, replacing the previous run's.
func (d *demo) keepLogs() error {
	if err := os.RemoveAll(d.logsDir); err != nil {
		return err
	}
	var errs []error
	for _, src := range []string{d.path("logs"), filepath.Join(d.clusterDir(), "logs")} {
		ents, err := os.ReadDir(src)
		if err != nil {
			continue
		}
		if err := os.MkdirAll(d.logsDir, 0o755); err != nil {
			return err
		}
		for _, e := range ents {
			if e.Type().IsRegular() {
				b, err := os.ReadFile(filepath.Join(src, e.Name()))
				if err == nil {
					err = os.WriteFile(filepath.Join(d.logsDir, e.Name()), b, 0o644)
				}
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// ---- small helpers ----

func indent(s, prefix string) string {
	s = strings.TrimRight(s, "\n")
	return prefix + strings.ReplaceAll(s, "\n", "\n"+prefix)
}

// prefixWriter indents the cluster harness's progress lines.
type prefixWriter struct {
	w      io.Writer
	prefix string
}

func (p prefixWriter) Write(b []byte) (int, error) {
	_, err := io.WriteString(p.w, indent(string(b), p.prefix)+"\n")
	return len(b), err
}
