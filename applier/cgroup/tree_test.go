package cgroup

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestKubepodsTree(t *testing.T) {
	tests := map[string]struct {
		dirs    []string // made below the hierarchy's root
		want    []string
		missing bool
	}{
		"lists the cgroupfs driver's kubepods tree, parents first": {
			dirs: []string{"kubepods/besteffort/podu1/c1", "kubepods/burstable", "system.slice/x"},
			want: []string{"kubepods", "kubepods/besteffort", "kubepods/besteffort/podu1", "kubepods/besteffort/podu1/c1", "kubepods/burstable"},
		},
		"lists the systemd driver's kubepods.slice tree": {
			dirs: []string{"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podu1.slice/cri-containerd-c1.scope"},
			want: []string{"kubepods.slice", "kubepods.slice/kubepods-besteffort.slice", "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podu1.slice",
				"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podu1.slice/cri-containerd-c1.scope"},
		},
		"lists every layout that exists (a node whose driver changed)": {
			dirs: []string{"kubepods/pod1", "kubelet.slice/kubelet-kubepods.slice"},
			want: []string{"kubepods", "kubepods/pod1", "kubelet.slice/kubelet-kubepods.slice"},
		},
		"no kubepods cgroup is an error wrapping os.ErrNotExist": {
			dirs: []string{"system.slice"}, missing: true,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			h, err := Open(newRoot(t, "v2"), V2)
			if err != nil {
				t.Fatal(err)
			}
			for _, d := range tc.dirs {
				if err := os.MkdirAll(h.Join(d), 0o755); err != nil {
					t.Fatal(err)
				}
				// A file in a cgroup is not a cgroup.
				if err := os.WriteFile(filepath.Join(h.Join(d), "io.max"), nil, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			got, err := h.KubepodsTree()
			if tc.missing {
				if !errors.Is(err, os.ErrNotExist) {
					t.Fatalf("KubepodsTree() = %v, %v; want an error wrapping os.ErrNotExist", got, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var want []string
			for _, w := range tc.want {
				want = append(want, h.Join(w))
			}
			if !slices.Equal(got, want) {
				t.Errorf("KubepodsTree() = %v\nwant %v", got, want)
			}
		})
	}
}
