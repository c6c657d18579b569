package cluster

import (
	"context"
	"reflect"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

var (
	v1Cgroupfs = Layout{Cgroup: cgroup.V1, Driver: cgroup.Cgroupfs, Runtime: "containerd", RuntimeVersion: "1.6.20"}
	v2Systemd  = Layout{Cgroup: cgroup.V2, Driver: cgroup.Systemd, Runtime: "containerd", RuntimeVersion: "2.4.2"}
)

func podWithQOS(uid string, qos corev1.PodQOSClass) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "p", UID: types.UID(uid)},
		Status:     corev1.PodStatus{QOSClass: qos},
	}
}

func TestLayoutCgroupPaths(t *testing.T) {
	const id = "0123abcd"
	const uid, uid_ = "6c1c6a3e-2b7d-4e0b-9f57-3f0a5a1d2c4b", "6c1c6a3e_2b7d_4e0b_9f57_3f0a5a1d2c4b"
	for name, tc := range map[string]struct {
		layout    Layout
		qos       corev1.PodQOSClass
		pod       string
		container string
		kubepods  string
	}{
		"a BestEffort pod on cgroup v1 with cgroupfs is under kubepods/besteffort in the blkio hierarchy": {
			v1Cgroupfs, corev1.PodQOSBestEffort,
			"/sys/fs/cgroup/blkio/kubepods/besteffort/pod" + uid,
			"/sys/fs/cgroup/blkio/kubepods/besteffort/pod" + uid + "/" + id,
			"/sys/fs/cgroup/blkio/kubepods",
		},
		"a Burstable pod on cgroup v1 with cgroupfs is under kubepods/burstable": {
			v1Cgroupfs, corev1.PodQOSBurstable,
			"/sys/fs/cgroup/blkio/kubepods/burstable/pod" + uid,
			"/sys/fs/cgroup/blkio/kubepods/burstable/pod" + uid + "/" + id,
			"/sys/fs/cgroup/blkio/kubepods",
		},
		"a Guaranteed pod on cgroup v1 with cgroupfs sits directly under kubepods": {
			v1Cgroupfs, corev1.PodQOSGuaranteed,
			"/sys/fs/cgroup/blkio/kubepods/pod" + uid,
			"/sys/fs/cgroup/blkio/kubepods/pod" + uid + "/" + id,
			"/sys/fs/cgroup/blkio/kubepods",
		},
		"a BestEffort pod on cgroup v2 with systemd is a slice in kubepods-besteffort.slice, its container a cri-containerd scope": {
			v2Systemd, corev1.PodQOSBestEffort,
			"/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uid_ + ".slice",
			"/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uid_ + ".slice/cri-containerd-" + id + ".scope",
			"/sys/fs/cgroup/kubepods.slice",
		},
		"a Burstable pod on cgroup v2 with systemd is a slice in kubepods-burstable.slice": {
			v2Systemd, corev1.PodQOSBurstable,
			"/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uid_ + ".slice",
			"/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uid_ + ".slice/cri-containerd-" + id + ".scope",
			"/sys/fs/cgroup/kubepods.slice",
		},
		"a Guaranteed pod on cgroup v2 with systemd is a slice directly in kubepods.slice": {
			v2Systemd, corev1.PodQOSGuaranteed,
			"/sys/fs/cgroup/kubepods.slice/kubepods-pod" + uid_ + ".slice",
			"/sys/fs/cgroup/kubepods.slice/kubepods-pod" + uid_ + ".slice/cri-containerd-" + id + ".scope",
			"/sys/fs/cgroup/kubepods.slice",
		},
	} {
		t.Run(name, func(t *testing.T) {
			pod := podWithQOS(uid, tc.qos)
			if got, err := tc.layout.PodCgroup(pod); err != nil || got != tc.pod {
				t.Errorf("PodCgroup = %q, %v; want %q", got, err, tc.pod)
			}
			if got, err := tc.layout.ContainerCgroup(pod, id); err != nil || got != tc.container {
				t.Errorf("ContainerCgroup = %q, %v; want %q", got, err, tc.container)
			}
			if got := tc.layout.KubepodsCgroup(); got != tc.kubepods {
				t.Errorf("KubepodsCgroup = %q, want %q", got, tc.kubepods)
			}
		})
	}
}

func TestLayoutCgroupPathErrors(t *testing.T) {
	for name, tc := range map[string]struct {
		layout Layout
		pod    *corev1.Pod
		id     string
		want   string
	}{
		"a pod without a QoS class in its status is an error, not a guess": {
			v1Cgroupfs, podWithQOS("u", ""), "abc", "QoS class",
		},
		"a pod without a UID is an error": {
			v2Systemd, &corev1.Pod{Status: corev1.PodStatus{QOSClass: corev1.PodQOSBestEffort}}, "abc", "no UID",
		},
		"a container ID with a slash is an error": {
			v1Cgroupfs, podWithQOS("u", corev1.PodQOSBestEffort), "../x", "container ID",
		},
		"an empty container ID is an error": {
			v2Systemd, podWithQOS("u", corev1.PodQOSBestEffort), "", "container ID",
		},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := tc.layout.ContainerCgroup(tc.pod, tc.id)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("ContainerCgroup = %q, %v; want an error saying %q", got, err, tc.want)
			}
		})
	}
}

func TestParseIOLimits(t *testing.T) {
	d70, d2540 := device.Device{Major: 7, Minor: 0}, device.Device{Major: 254, Minor: 0}
	for name, tc := range map[string]struct {
		layout Layout
		files  map[string]string
		want   map[device.Device]limits.Limits
	}{
		"cgroup v1's four blkio files become one limit set per device": {
			v1Cgroupfs, map[string]string{
				"blkio.throttle.read_iops_device":  "7:0 200\n254:0 50\n",
				"blkio.throttle.write_iops_device": "7:0 100\n",
				"blkio.throttle.read_bps_device":   "",
				"blkio.throttle.write_bps_device":  "7:0 1048576\n",
			},
			map[device.Device]limits.Limits{
				d70:   {ReadIOPS: 200, WriteIOPS: 100, WriteBPS: 1048576},
				d2540: {ReadIOPS: 50},
			},
		},
		"empty cgroup v1 files are no limits at all": {
			v1Cgroupfs, map[string]string{}, map[device.Device]limits.Limits{},
		},
		"cgroup v2's io.max lines give the same limit sets, max being unlimited": {
			v2Systemd, map[string]string{
				"io.max": "7:0 rbps=max wbps=1048576 riops=200 wiops=100\n254:0 rbps=max wbps=max riops=50 wiops=max\n",
			},
			map[device.Device]limits.Limits{
				d70:   {ReadIOPS: 200, WriteIOPS: 100, WriteBPS: 1048576},
				d2540: {ReadIOPS: 50},
			},
		},
		"an empty io.max is no limits at all": {
			v2Systemd, map[string]string{"io.max": ""}, map[device.Device]limits.Limits{},
		},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := ParseIOLimits(tc.layout, tc.files)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
	if _, err := ParseIOLimits(v1Cgroupfs, map[string]string{"blkio.throttle.read_iops_device": "7:0 lots"}); err == nil ||
		!strings.Contains(err.Error(), "blkio.throttle.read_iops_device") {
		t.Errorf("a bad v1 line: error %v, want one naming the file", err)
	}
}

func TestLimitFiles(t *testing.T) {
	if got, want := v1Cgroupfs.limitFiles(), []string{"blkio.throttle.read_iops_device", "blkio.throttle.write_iops_device",
		"blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device"}; !reflect.DeepEqual(got, want) {
		t.Errorf("v1 limit files %v, want %v", got, want)
	}
	if got := v2Systemd.limitFiles(); !reflect.DeepEqual(got, []string{"io.max"}) {
		t.Errorf("v2 limit files %v, want [io.max]", got)
	}
}

func TestNodeKinds(t *testing.T) {
	for in, want := range map[string]NodeKind{"": HostNode, "host": HostNode, "v2": V2Node} {
		if got, err := ParseNodeKind(in); err != nil || got != want {
			t.Errorf("ParseNodeKind(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := ParseNodeKind("v3"); err == nil {
		t.Error("ParseNodeKind(v3) succeeded")
	}
	if _, registered := nodeKinds[V2Node]; !registered {
		_, err := Up(context.Background(), Config{Node: V2Node, Dir: t.TempDir()})
		if err == nil || !strings.Contains(err.Error(), "v2") || !strings.Contains(err.Error(), "not in this build") {
			t.Errorf("Up on the unbuilt v2 node kind: %v; want an error saying it is not built yet", err)
		}
	}
}

func TestServerVersion(t *testing.T) {
	for name, tc := range map[string]struct{ out, want string }{
		"the server's version is read from ctr version, not the client's": {
			"Client:\n  Version:  1.7.0\n  Revision: x\n  Go version: go1.19\n\nServer:\n  Version:  1.6.20~ds1\n  Revision: 1.6.20~ds1-1+b1\n  UUID: u\n", "1.6.20~ds1",
		},
		"output without a server part is unknown": {"Client:\n  Version:  1.7.0\n", "unknown"},
	} {
		t.Run(name, func(t *testing.T) {
			if got := serverVersion(tc.out); got != tc.want {
				t.Errorf("serverVersion = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestParseIOStatSamples(t *testing.T) {
	disk := device.Device{Major: 254, Minor: 16}
	for name, tc := range map[string]struct {
		v       cgroup.Version
		out     string
		want    []IOStatSample
		wantErr string
	}{
		"cgroup v2's io.stat per sample, other devices left out": {
			cgroup.V2, "@ 1000000000\n# io.stat\n254:16 rbytes=4096 wbytes=0 rios=10 wios=2 dbytes=0 dios=0\n254:0 rbytes=1 wbytes=1 rios=99 wios=99 dbytes=0 dios=0\n" +
				"@ 1500000000\n# io.stat\n254:16 rbytes=8192 wbytes=0 rios=310 wios=302 dbytes=0 dios=0\n",
			[]IOStatSample{
				{At: time.Unix(1, 0), IOStat: cgroup.IOStat{ReadBytes: 4096, ReadIOs: 10, WriteIOs: 2}},
				{At: time.Unix(1, 5e8), IOStat: cgroup.IOStat{ReadBytes: 8192, ReadIOs: 310, WriteIOs: 302}},
			}, "",
		},
		"cgroup v1's recursive files, a device without IO yet at zero": {
			cgroup.V1, "@ 2000000000\n# blkio.throttle.io_serviced_recursive\nTotal 0\n# blkio.throttle.io_service_bytes_recursive\nTotal 0\n" +
				"@ 3000000000\n# blkio.throttle.io_serviced_recursive\n254:16 Read 5\n254:16 Write 7\n254:16 Total 12\nTotal 12\n# blkio.throttle.io_service_bytes_recursive\n254:16 Read 20480\n254:16 Write 28672\n254:16 Total 49152\nTotal 49152\n",
			[]IOStatSample{
				{At: time.Unix(2, 0)},
				{At: time.Unix(3, 0), IOStat: cgroup.IOStat{ReadBytes: 20480, WriteBytes: 28672, ReadIOs: 5, WriteIOs: 7}},
			}, "",
		},
		"one sample is not a rate": {cgroup.V2, "@ 1000000000\n# io.stat\n", nil, "1 samples, want 2 or more"},
		"a sample without its file is an error naming it": {
			cgroup.V2, "@ 1000000000\n@ 2000000000\n# io.stat\n", nil, "io.stat",
		},
		"a time that is not a number": {cgroup.V2, "@ soon\n", nil, `a time "@ soon"`},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := parseIOStatSamples(tc.out, tc.v, "/sys/fs/cgroup/kubepods.slice", disk)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestRates(t *testing.T) {
	at := func(ms int64, r, w uint64) IOStatSample {
		return IOStatSample{At: time.UnixMilli(ms), IOStat: cgroup.IOStat{ReadIOs: r, WriteIOs: w}}
	}
	// Samples every 0.5 s: each rate spans the first sample a second or
	// more later; the last samples have none.
	samples := []IOStatSample{at(0, 0, 0), at(500, 300, 100), at(1000, 600, 200), at(1500, 1500, 300), at(2000, 1600, 400)}
	r, w := Rates(samples, time.UnixMilli(0), time.UnixMilli(2000), time.Second)
	if want := []float64{600, 1200, 1000}; !reflect.DeepEqual(r, want) {
		t.Errorf("read rates %v, want %v", r, want)
	}
	if want := []float64{200, 200, 200}; !reflect.DeepEqual(w, want) {
		t.Errorf("write rates %v, want %v", w, want)
	}
	// Only the samples from from to to count: the fio run's, not the
	// exec's start before it.
	if r, _ := Rates(samples, time.UnixMilli(500), time.UnixMilli(1500), time.Second); !reflect.DeepEqual(r, []float64{1200}) {
		t.Errorf("read rates from 0.5 s to 1.5 s %v, want [1200]", r)
	}
	if r, _ := Rates(samples, time.UnixMilli(600), time.UnixMilli(1500), time.Second); r != nil {
		t.Errorf("read rates over less than a second %v, want none", r)
	}
}
