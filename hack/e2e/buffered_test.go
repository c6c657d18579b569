package e2e

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/hack/cluster"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

const (
	// bufferedBPS is the write-bps of testBufferedWrites' pod, and
	// bufferedMiB what it writes in each case: 4 s at the limit.
	bufferedBPS = 1 << 20
	bufferedMiB = 4
)

// testBufferedWrites: what a write-bps limit does to writes through the
// page cache (no O_DIRECT), in the container of an opted-in pod annotated
// kubediskguard.io/write-bps=1Mi (its IOPS unlimited), 4 MiB in each case,
// timed in the container (/proc/uptime), the bytes charged to its cgroup
// read from the kernel's counters on the node:
//   - written, then the process's own fsync (dd conv=fsync): held to the
//     limit on both cgroup versions, since the fsync submits the dirty pages
//     in the process's context;
//   - written and left to the kernel's writeback (the dd returns at once; a
//     syncfs(2) of the data disk in the container then waits for the
//     writeback, which the kernel's flusher threads do): on cgroup v2
//     the writeback is charged to the container's cgroup and held to the
//     limit; on cgroup v1 it is neither held nor charged to the container,
//     which the applier says at start on a v1 node (and not on v2) and the
//     README's limits section says.
//
// A held case slower than the band (other IO on the node) is measured once
// more; faster than it fails at once.
func (e *env) testBufferedWrites(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), e.f.slowed(3*time.Minute))
	defer cancel()
	layout := e.c.Node.Layout()
	pod := e.c.Pod(optedIn, "buffered", "sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done")
	pod.Annotations = map[string]string{"kubediskguard.io/iops": "unlimited", "kubediskguard.io/write-bps": "1Mi"}
	pod.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "data", MountPath: "/data"}}
	pod.Spec.Volumes = []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: e.data()}}}}
	if _, err := e.c.Client.CoreV1().Pods(optedIn).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		e.deletePods(t, pod)
		e.c.Node.Run(context.Background(), "rm", "-f", e.data("buffered-fsync.dat"), e.data("buffered-writeback.dat"))
	})
	pod, err := e.c.WaitRunning(ctx, optedIn, pod.Name, e.c.PodTimeout())
	if err != nil {
		t.Fatal(err)
	}
	dir, err := e.c.ContainerCgroup(pod, "main")
	if err != nil {
		t.Fatal(err)
	}
	e.waitWriteBPS(ctx, t, dir, bufferedBPS)

	held := time.Duration(bufferedMiB*(1<<20)/bufferedBPS) * time.Second
	band := func(d time.Duration) string {
		switch {
		case d < held*8/10:
			return "faster"
		case d > held*5/2:
			return "slower"
		}
		return ""
	}
	// charged runs script in the container and returns its output's
	// fields (uptimes) and the bytes the kernel charged to its cgroup
	// for writes on the data disk meanwhile.
	charged := func(script string) ([]float64, uint64) {
		t.Helper()
		before := e.writeBytes(ctx, t, dir)
		out, err := e.c.Kubectl(ctx, "exec", "-n", optedIn, pod.Name, "-c", "main", "--", "sh", "-c",
			`up() { read u _ < /proc/uptime; echo -n "$u "; }; `+script)
		if err != nil {
			t.Fatalf("kubectl exec %q: %v", script, err)
		}
		var at []float64
		for _, f := range strings.Fields(string(out)) {
			v, err := strconv.ParseFloat(f, 64)
			if err != nil {
				t.Fatalf("kubectl exec %q: output %q: %v", script, out, err)
			}
			at = append(at, v)
		}
		return at, e.writeBytes(ctx, t, dir) - before
	}
	secs := func(a, b float64) time.Duration {
		return time.Duration((b - a) * float64(time.Second)).Round(10 * time.Millisecond)
	}
	dd := func(file, conv string) string {
		return fmt.Sprintf("dd if=/dev/zero of=/data/%s bs=1M count=%d %s status=none", file, bufferedMiB, conv)
	}
	size := uint64(bufferedMiB << 20)

	// Written, then its own fsync: held on both.
	var took time.Duration
	var bytes uint64
	for try := 1; ; try++ {
		at, b := charged("up; " + dd("buffered-fsync.dat", "conv=fsync") + "; up")
		took, bytes = secs(at[0], at[1]), b
		t.Logf("%d MiB buffered write + fsync at write-bps=1Mi on cgroup %s: %s, %d KiB charged to the container (load %s)",
			bufferedMiB, layout.Cgroup, took, bytes>>10, realtest.LoadAverage())
		if band(took) != "slower" || try == 2 {
			break
		}
	}
	if b := band(took); b != "" {
		t.Errorf("a %d MiB buffered write + fsync at write-bps=1Mi took %s, want %s..%s (held to the limit): %s", bufferedMiB, took, held*8/10, held*5/2, b)
	}
	if bytes < size {
		t.Errorf("a %d MiB buffered write + fsync charged %d KiB to the container's cgroup, want at least %d KiB", bufferedMiB, bytes>>10, size>>10)
	}

	// Left to the writeback, which a sync in the container waits for.
	var write, sync time.Duration
	for try := 1; ; try++ {
		at, b := charged("up; " + dd("buffered-writeback.dat", "") + "; up; sync -f /data/buffered-writeback.dat; up")
		write, sync, bytes = secs(at[0], at[1]), secs(at[1], at[2]), b
		t.Logf("%d MiB buffered write at write-bps=1Mi on cgroup %s: returned in %s, its writeback (syncfs) %s, %d KiB charged to the container (load %s)",
			bufferedMiB, layout.Cgroup, write, sync, bytes>>10, realtest.LoadAverage())
		if layout.Cgroup == cgroup.V1 || band(sync) != "slower" || try == 2 {
			break
		}
	}
	if write > held/2 {
		t.Errorf("a %d MiB buffered write with no sync took %s, want it to return before its writeback (under %s)", bufferedMiB, write, held/2)
	}
	log := e.applierLog(ctx, t)
	_, noticed := findLog(log, "cgroup v1", "buffered writes", "neither limited nor counted")
	if layout.Cgroup == cgroup.V1 {
		// What the applier says at start on v1, and README's limits section.
		if sync > held/2 || bytes >= 1<<20 {
			t.Errorf("on cgroup v1 the writeback of a %d MiB buffered write took %s with %d KiB charged to the container, want it neither held (under %s) nor charged (under 1 MiB), as README and the applier say",
				bufferedMiB, sync, bytes>>10, held/2)
		}
		if !noticed {
			t.Errorf("on cgroup v1 the applier did not log at start that buffered writes written back by the kernel are not limited; its log:\n%s", tail(log, 20))
		}
		return
	}
	if b := band(sync); b != "" {
		t.Errorf("on cgroup %s the writeback of a %d MiB buffered write took %s, want %s..%s (held to the limit): %s", layout.Cgroup, bufferedMiB, sync, held*8/10, held*5/2, b)
	}
	if bytes < size {
		t.Errorf("on cgroup %s the writeback of a %d MiB buffered write charged %d KiB to the container's cgroup, want at least %d KiB", layout.Cgroup, bufferedMiB, bytes>>10, size>>10)
	}
	if noticed {
		t.Errorf("on cgroup %s the applier logs the cgroup v1 notice about buffered writes", layout.Cgroup)
	}
}

// waitWriteBPS waits until the cgroup at dir on the node limits the data
// disk's writes to bps bytes/s.
func (e *env) waitWriteBPS(ctx context.Context, t *testing.T, dir string, bps uint64) {
	t.Helper()
	disk := e.c.Node.DataDisk()
	var got string
	if err := cluster.Poll(ctx, "write-bps in "+dir, 100*time.Millisecond, e.f.slowed(30*time.Second), func() error {
		l, err := cluster.IOLimits(ctx, e.c.Node, dir)
		if err != nil {
			got = err.Error()
			return err
		}
		got = cluster.FormatIOLimits(l)
		if l[disk].WriteBPS != bps {
			return errors.New("not yet")
		}
		return nil
	}); err != nil {
		t.Fatalf("cgroup %s limits %s, want write-bps %d on the data disk %s", dir, got, bps, disk)
	}
}

// writeBytes is the bytes the kernel charged to the cgroup at dir on the
// node for writes on the data disk.
func (e *env) writeBytes(ctx context.Context, t *testing.T, dir string) uint64 {
	t.Helper()
	return e.ioStat(ctx, t, dir).WriteBytes
}
