package cgroup

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kubediskguard/kubediskguard/applier/device"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

func TestExpandSlice(t *testing.T) {
	tests := map[string]struct {
		in, want string
		wantErr  bool
	}{
		"a top-level slice is itself":                  {in: "kubepods.slice", want: "kubepods.slice"},
		"every dash starts a child slice":              {in: "a-b-c.slice", want: "a.slice/a-b.slice/a-b-c.slice"},
		"a QoS slice of the default root":              {in: "kubepods-besteffort.slice", want: "kubepods.slice/kubepods-besteffort.slice"},
		"a kubelet.slice root works like any other":    {in: "kubelet-kubepods.slice", want: "kubelet.slice/kubelet-kubepods.slice"},
		"a pod slice with underscores in its UID":      {in: "kubepods-pod3f1d_42ab.slice", want: "kubepods.slice/kubepods-pod3f1d_42ab.slice"},
		"the root slice is the root":                   {in: "-.slice", want: ""},
		"a name without the .slice suffix is rejected": {in: "kubepods", wantErr: true},
		"a scope is rejected":                          {in: "docker-1.scope", wantErr: true},
		"a bare suffix is rejected":                    {in: ".slice", wantErr: true},
		"a slash is rejected":                          {in: "kubepods.slice/kubepods-besteffort.slice", wantErr: true},
		"a double dash is rejected":                    {in: "a--b.slice", wantErr: true},
		"a leading dash is rejected":                   {in: "-a.slice", wantErr: true},
		"a trailing dash is rejected":                  {in: "a-.slice", wantErr: true},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := ExpandSlice(tc.in)
			if tc.wantErr {
				if err == nil || !strings.Contains(err.Error(), "invalid systemd slice name") {
					t.Fatalf("ExpandSlice(%q) = %q, %v; want an error", tc.in, got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ExpandSlice(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
			}
		})
	}
}

// hybridProcCgroup is /proc/<pid>/cgroup of a container on a hybrid host.
const hybridProcCgroup = `12:hugetlb:/kubepods/besteffort/pod1/ctr1
9:name=systemd:/kubepods/besteffort/pod1/ctr1
8:pids:/kubepods/besteffort/pod1/ctr1
7:blkio:/kubepods/besteffort/pod1/ctr1
3:cpu,cpuacct:/kubepods/besteffort/pod1/ctr1
0::/kubepods/besteffort/pod1/ctr1
`

func TestParseProcCgroup(t *testing.T) {
	tests := map[string]struct {
		content string
		version Version
		want    string
		wantErr string
		gone    bool
	}{
		"v1 takes the blkio line": {
			content: hybridProcCgroup, version: V1, want: "/kubepods/besteffort/pod1/ctr1",
		},
		"v1 finds blkio mounted together with another controller": {
			content: "4:memory:/a\n5:blkio,net_cls:/kubepods.slice/kubepods-pod1.slice/docker-ab.scope\n", version: V1,
			want: "/kubepods.slice/kubepods-pod1.slice/docker-ab.scope",
		},
		"v1 does not mistake a named hierarchy for blkio": {
			content: "9:name=blkio:/x\n0::/y\n", version: V1, wantErr: "no line for the blkio controller",
		},
		"v2 takes the 0:: line": {
			content: "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-ab.scope\n", version: V2,
			want: "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-ab.scope",
		},
		"v2 on a hybrid host's file takes the 0:: line": {
			content: "7:blkio:/a\n0::/b\n", version: V2, want: "/b",
		},
		"a path with a colon is kept whole": {
			content: "0::/odd:name\n", version: V2, want: "/odd:name",
		},
		"a removed cgroup is ErrCgroupGone": {
			content: "0::/kubepods/pod1/ctr1 (deleted)\n", version: V2, gone: true, wantErr: "/kubepods/pod1/ctr1 was removed",
		},
		"a file without a 0:: line is an error on v2": {
			content: "7:blkio:/a\n", version: V2, wantErr: `no "0::" line`,
		},
		"a relative path is an error": {
			content: "0::kubepods\n", version: V2, wantErr: "not absolute",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := ParseProcCgroup(tc.content, tc.version)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || errors.Is(err, ErrCgroupGone) != tc.gone {
					t.Fatalf("ParseProcCgroup = %q, %v; want an error containing %q (gone: %v)", got, err, tc.wantErr, tc.gone)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseProcCgroup = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestProcessDir(t *testing.T) {
	for _, v := range []Version{V1, V2} {
		t.Run(v.String(), func(t *testing.T) {
			h, _ := newHierarchy(t, v)
			proc := t.TempDir()
			write(t, filepath.Join(proc, "4242", "cgroup"), hybridProcCgroup)
			got, err := h.ProcessDir(proc, 4242)
			if want := h.Join("/kubepods/besteffort/pod1/ctr1"); err != nil || got != want {
				t.Fatalf("ProcessDir = %q, %v; want %q", got, err, want)
			}
			_, err = h.ProcessDir(proc, 4243)
			if !errors.Is(err, ErrCgroupGone) || !strings.Contains(err.Error(), "process 4243") {
				t.Errorf("ProcessDir of an exited process = %v, want ErrCgroupGone naming it", err)
			}
			write(t, filepath.Join(proc, "4244", "cgroup"), "garbage\n")
			if _, err := h.ProcessDir(proc, 4244); err == nil || !strings.Contains(err.Error(), filepath.Join(proc, "4244", "cgroup")) {
				t.Errorf("ProcessDir of a garbage file = %v, want an error naming it", err)
			}
		})
	}
}

// containerSource is how a test case names a container's cgroup: by an OCI
// spec's cgroups path (containerd) or by Docker's cgroup parent and driver.
type containerSource struct {
	specPath     string
	dockerParent string
	dockerID     string
	driver       Driver
}

func (s containerSource) dir(h *Hierarchy) (string, error) {
	if s.dockerID != "" {
		return h.DockerDir(s.dockerParent, s.dockerID, s.driver)
	}
	return h.SpecDir(s.specPath)
}

// TestContainerLayouts finds the cgroup of a container in every layout a
// node can have: cgroup v1 and v2, the kubelet's cgroupfs and systemd
// drivers, containerd and Docker, every QoS class, and the kubelet.slice
// root of the second seed. For each, the cgroup laid out in a fake
// hierarchy takes limits, and the kubepods cgroup above it is found both
// from the container and by probing.
func TestContainerLayouts(t *testing.T) {
	const (
		uid  = "c42adbb2-915e-4883-aa26-7ed96c3196da"
		suid = "c42adbb2_915e_4883_aa26_7ed96c3196da"
		id   = "16c0f5cee8ed9a2b"
	)
	tests := map[string]struct {
		src      containerSource
		want     string // the container's path in the hierarchy
		kubepods string
	}{
		"containerd, cgroupfs, besteffort": {
			src:      containerSource{specPath: "/kubepods/besteffort/pod" + uid + "/" + id},
			want:     "/kubepods/besteffort/pod" + uid + "/" + id,
			kubepods: "/kubepods",
		},
		"containerd, cgroupfs, burstable": {
			src:      containerSource{specPath: "/kubepods/burstable/pod" + uid + "/" + id},
			want:     "/kubepods/burstable/pod" + uid + "/" + id,
			kubepods: "/kubepods",
		},
		"containerd, cgroupfs, guaranteed pods sit directly in kubepods": {
			src:      containerSource{specPath: "/kubepods/pod" + uid + "/" + id},
			want:     "/kubepods/pod" + uid + "/" + id,
			kubepods: "/kubepods",
		},
		"containerd, systemd, besteffort": {
			src:      containerSource{specPath: "kubepods-besteffort-pod" + suid + ".slice:cri-containerd:" + id},
			want:     "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + suid + ".slice/cri-containerd-" + id + ".scope",
			kubepods: "/kubepods.slice",
		},
		"containerd, systemd, burstable": {
			src:      containerSource{specPath: "kubepods-burstable-pod" + suid + ".slice:cri-containerd:" + id},
			want:     "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + suid + ".slice/cri-containerd-" + id + ".scope",
			kubepods: "/kubepods.slice",
		},
		"containerd, systemd, guaranteed": {
			src:      containerSource{specPath: "kubepods-pod" + suid + ".slice:cri-containerd:" + id},
			want:     "/kubepods.slice/kubepods-pod" + suid + ".slice/cri-containerd-" + id + ".scope",
			kubepods: "/kubepods.slice",
		},
		"the seed's besteffort example with a kubelet.slice root": {
			src:      containerSource{specPath: "kubelet-kubepods-besteffort-podc42adbb2_915e_4883_aa26_7ed96c3196da.slice:cri-containerd:16c0f5cee8ed9"},
			want:     "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-podc42adbb2_915e_4883_aa26_7ed96c3196da.slice/cri-containerd-16c0f5cee8ed9.scope",
			kubepods: "/kubelet.slice/kubelet-kubepods.slice",
		},
		"the seed's burstable example with a kubelet.slice root": {
			src:      containerSource{specPath: "kubelet-kubepods-burstable-pod123.slice:cri-containerd:abc123"},
			want:     "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod123.slice/cri-containerd-abc123.scope",
			kubepods: "/kubelet.slice/kubelet-kubepods.slice",
		},
		"the seed's guaranteed example with a kubelet.slice root": {
			src:      containerSource{specPath: "kubelet-kubepods-poda5762175_5440_4e1e_be30_a69d9073ce0c.slice:cri-containerd:def456"},
			want:     "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-poda5762175_5440_4e1e_be30_a69d9073ce0c.slice/cri-containerd-def456.scope",
			kubepods: "/kubelet.slice/kubelet-kubepods.slice",
		},
		"the seed's besteffort example with the default kubepods.slice root": {
			src:      containerSource{specPath: "kubepods-besteffort-podc42adbb2_915e_4883_aa26_7ed96c3196da.slice:cri-containerd:16c0f5cee8ed9"},
			want:     "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podc42adbb2_915e_4883_aa26_7ed96c3196da.slice/cri-containerd-16c0f5cee8ed9.scope",
			kubepods: "/kubepods.slice",
		},
		"the seed's cgroupfs example": {
			src:      containerSource{specPath: "/kubepods/burstable/podc9c501eb-9423-4bd6-b96f-7f10f7f4527c/f3ee04629f75567e95fae8425cb3e9b3e1c91346b1a2ddee9139c9216c713dc7"},
			want:     "/kubepods/burstable/podc9c501eb-9423-4bd6-b96f-7f10f7f4527c/f3ee04629f75567e95fae8425cb3e9b3e1c91346b1a2ddee9139c9216c713dc7",
			kubepods: "/kubepods",
		},
		"docker, cgroupfs, burstable, as the seed's docker inspect shows": {
			src:      containerSource{dockerParent: "/kubepods/burstable/pod4b5860c3-7ac8-47b6-921d-053136bfc3c9", dockerID: "b6abba6fc231831d", driver: Cgroupfs},
			want:     "/kubepods/burstable/pod4b5860c3-7ac8-47b6-921d-053136bfc3c9/b6abba6fc231831d",
			kubepods: "/kubepods",
		},
		"docker, cgroupfs, besteffort": {
			src:      containerSource{dockerParent: "/kubepods/besteffort/pod" + uid, dockerID: id, driver: Cgroupfs},
			want:     "/kubepods/besteffort/pod" + uid + "/" + id,
			kubepods: "/kubepods",
		},
		"docker, cgroupfs, guaranteed": {
			src:      containerSource{dockerParent: "/kubepods/pod" + uid, dockerID: id, driver: Cgroupfs},
			want:     "/kubepods/pod" + uid + "/" + id,
			kubepods: "/kubepods",
		},
		"docker, systemd, burstable": {
			src:      containerSource{dockerParent: "kubepods-burstable-pod" + suid + ".slice", dockerID: id, driver: Systemd},
			want:     "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + suid + ".slice/docker-" + id + ".scope",
			kubepods: "/kubepods.slice",
		},
		"docker, systemd, besteffort": {
			src:      containerSource{dockerParent: "kubepods-besteffort-pod" + suid + ".slice", dockerID: id, driver: Systemd},
			want:     "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + suid + ".slice/docker-" + id + ".scope",
			kubepods: "/kubepods.slice",
		},
		"docker, systemd, guaranteed": {
			src:      containerSource{dockerParent: "kubepods-pod" + suid + ".slice", dockerID: id, driver: Systemd},
			want:     "/kubepods.slice/kubepods-pod" + suid + ".slice/docker-" + id + ".scope",
			kubepods: "/kubepods.slice",
		},
		"docker, systemd, with a kubelet.slice root": {
			src:      containerSource{dockerParent: "kubelet-kubepods-besteffort-pod" + suid + ".slice", dockerID: id, driver: Systemd},
			want:     "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + suid + ".slice/docker-" + id + ".scope",
			kubepods: "/kubelet.slice/kubelet-kubepods.slice",
		},
	}
	for _, v := range []Version{V1, V2} {
		for name, tc := range tests {
			t.Run(v.String()+", "+name, func(t *testing.T) {
				h, _ := newHierarchy(t, v)
				got, err := tc.src.dir(h)
				if err != nil {
					t.Fatal(err)
				}
				if want := h.Join(tc.want); got != want {
					t.Fatalf("container dir = %s\nwant             %s", got, want)
				}
				if v == V1 && !strings.HasPrefix(got, filepath.Join(filepath.Dir(h.Dir()), "blkio")+"/") {
					t.Errorf("v1 dir %s is not under <root>/blkio", got)
				}

				mkCgroup(t, h, tc.want)
				l := limits.Limits{ReadIOPS: 500, WriteIOPS: 500, WriteBPS: 50 << 20}
				if _, err := h.Apply(got, []device.Device{vda}, l); err != nil {
					t.Fatal(err)
				}
				if now, err := h.Read(got); err != nil || now[vda] != l {
					t.Errorf("Read = %v, %v; want %v", now, err, l)
				}

				kp, err := h.KubepodsOf(got)
				if want := h.Join(tc.kubepods); err != nil || kp != want {
					t.Errorf("KubepodsOf = %s, %v; want %s", kp, err, want)
				}
				kp, err = h.FindKubepods()
				if want := h.Join(tc.kubepods); err != nil || kp != want {
					t.Errorf("FindKubepods = %s, %v; want %s", kp, err, want)
				}
			})
		}
	}
}

func TestStandaloneDockerContainers(t *testing.T) {
	h, _ := newHierarchy(t, V1)
	tests := map[string]struct {
		parent, id string
		driver     Driver
		want       string
		wantErr    string
	}{
		"cgroupfs without a parent is under /docker": {
			id: "abc", driver: Cgroupfs, want: "/docker/abc",
		},
		"systemd without a parent is a scope in system.slice": {
			id: "abc", driver: Systemd, want: "/system.slice/docker-abc.scope",
		},
		"systemd with a parent that is not a slice is an error": {
			parent: "/kubepods/pod1", id: "abc", driver: Systemd, wantErr: "invalid systemd slice name",
		},
		"an ID with a slash is an error": {
			id: "../../etc", driver: Cgroupfs, wantErr: "invalid container ID",
		},
		"an empty ID is an error": {
			driver: Systemd, wantErr: "invalid container ID",
		},
		"an unknown driver is an error": {
			id: "abc", wantErr: "unknown cgroup driver",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := h.DockerDir(tc.parent, tc.id, tc.driver)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("DockerDir = %q, %v; want an error containing %q", got, err, tc.wantErr)
				}
				return
			}
			if want := h.Join(tc.want); err != nil || got != want {
				t.Fatalf("DockerDir = %q, %v; want %q", got, err, want)
			}
		})
	}
	if _, err := h.KubepodsOf(h.Join("/docker/abc")); err == nil {
		t.Error("KubepodsOf a container outside Kubernetes should be an error")
	}
}

func TestSpecDirErrors(t *testing.T) {
	h, _ := newHierarchy(t, V2)
	tests := map[string]struct{ path, wantErr string }{
		"an empty path":                      {"", "empty cgroups path"},
		"two fields":                         {"kubepods.slice:abc", "want a path or SLICE:PREFIX:NAME"},
		"a slice that is not a slice":        {"kubepods:cri-containerd:abc", "invalid systemd slice name"},
		"a name that is not a path element":  {"kubepods.slice:cri-containerd:..", "invalid container ID"},
		"a slice with an empty component":    {"kubepods--pod1.slice:cri-containerd:abc", "empty component"},
		"a path in the slice field of a pod": {"a/b.slice:cri-containerd:abc", "without a slash"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := h.SpecDir(tc.path)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("SpecDir(%q) = %q, %v; want an error containing %q", tc.path, got, err, tc.wantErr)
			}
		})
	}
	// An empty slice is system.slice, as in runc.
	if got, err := h.SpecDir(":cri-containerd:abc"); err != nil || got != h.Join("/system.slice/cri-containerd-abc.scope") {
		t.Errorf("SpecDir with an empty slice = %q, %v", got, err)
	}
}

func TestFindKubepods(t *testing.T) {
	h, _ := newHierarchy(t, V2)
	_, err := h.FindKubepods()
	if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "kubelet.slice/kubelet-kubepods.slice") {
		t.Fatalf("FindKubepods on a node without pods = %v, want a not-exist error listing the probes", err)
	}
	mkCgroup(t, h, "/kubepods")
	mkCgroup(t, h, "/kubepods.slice")
	_, err = h.FindKubepods()
	if err == nil || !strings.Contains(err.Error(), "several kubepods cgroups") {
		t.Fatalf("FindKubepods with two layouts = %v, want an ambiguity error", err)
	}
	if kp, err := h.KubepodsOf(h.Join("/kubepods.slice/kubepods-pod1.slice")); err != nil || kp != h.Join("/kubepods.slice") {
		t.Errorf("KubepodsOf still works: %s, %v", kp, err)
	}
	if kp, err := h.KubepodsOf(h.Join("/kubepods")); err != nil || kp != h.Join("/kubepods") {
		t.Errorf("KubepodsOf the kubepods cgroup itself = %s, %v", kp, err)
	}
}

func TestProcessPathsOutsideTheCgroupNamespaceAreRefused(t *testing.T) {
	for name, content := range map[string]string{
		"a v2 path above the namespace root": "0::/../../kubepods/besteffort/pod1/c1\n",
		"a v1 path above the namespace root": "5:blkio:/../kubepods/c1\n",
	} {
		t.Run(name, func(t *testing.T) {
			v := V2
			if strings.Contains(content, "blkio") {
				v = V1
			}
			if _, err := ParseProcCgroup(content, v); !errors.Is(err, ErrCgroupNamespace) {
				t.Fatalf("err = %v, want ErrCgroupNamespace", err)
			}
		})
	}
	h, err := Open(newRoot(t, "v2"), Auto)
	if err != nil {
		t.Fatal(err)
	}
	proc := t.TempDir()
	write(t, filepath.Join(proc, "1", "cgroup"), "0::/../..\n")
	if err := h.CheckNamespace(proc); !errors.Is(err, ErrCgroupNamespace) {
		t.Fatalf("CheckNamespace = %v, want ErrCgroupNamespace", err)
	}
	write(t, filepath.Join(proc, "1", "cgroup"), "0::/init.scope\n")
	if err := h.CheckNamespace(proc); err != nil {
		t.Fatalf("CheckNamespace in the host namespace = %v", err)
	}
}

func TestContainerDirOf(t *testing.T) {
	h, err := Open(newRoot(t, "v2"), Auto)
	if err != nil {
		t.Fatal(err)
	}
	id := "16c0f5cee8ed9"
	tests := map[string]struct {
		path, want string
		ok         bool
	}{
		"finds a cgroupfs container cgroup":             {"/kubepods/besteffort/pod1/" + id, "/kubepods/besteffort/pod1/" + id, true},
		"finds a systemd scope named after the id":      {"/kubepods.slice/kubepods-pod1.slice/cri-containerd-" + id + ".scope", "/kubepods.slice/kubepods-pod1.slice/cri-containerd-" + id + ".scope", true},
		"climbs out of cgroups nested in the container": {"/kubepods/burstable/pod1/" + id + "/init.scope", "/kubepods/burstable/pod1/" + id, true},
		"refuses the root cgroup of an exited process":  {"/", "", false},
		"refuses another container's cgroup":            {"/kubepods/besteffort/pod1/0ther", "", false},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, ok := h.ContainerDirOf(h.Join(tc.path), id)
			if ok != tc.ok || (ok && got != h.Join(tc.want)) {
				t.Fatalf("ContainerDirOf(%s) = %q, %v; want %q, %v", tc.path, got, ok, h.Join(tc.want), tc.ok)
			}
		})
	}
}

func TestTheRootCgroupIsNeverLimited(t *testing.T) {
	for _, v := range []Version{V1, V2} {
		h, _ := newHierarchy(t, v)
		if _, err := h.Apply(h.Dir(), []device.Device{vda}, limits.Limits{ReadIOPS: 200}); err == nil || !strings.Contains(err.Error(), "root cgroup") {
			t.Fatalf("%v: Apply on the root = %v, want a refusal", v, err)
		}
	}
}
