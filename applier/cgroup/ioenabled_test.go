package cgroup

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCheckIOEnabled(t *testing.T) {
	for name, tc := range map[string]struct {
		kubepods string            // "" = none yet
		subtree  map[string]string // cgroup (path in the hierarchy) → cgroup.subtree_control
		wantErr  string            // substring; "" = nil
	}{
		"io enabled from the root down to kubepods.slice (systemd driver)": {
			kubepods: "kubepods.slice",
			subtree:  map[string]string{"/": "cpu io memory pids", "/kubepods.slice": "cpu io memory pids"},
		},
		"io enabled down to kubelet.slice/kubelet-kubepods.slice": {
			kubepods: "kubelet.slice/kubelet-kubepods.slice",
			subtree:  map[string]string{"/": "io memory", "/kubelet.slice": "io memory", "/kubelet.slice/kubelet-kubepods.slice": "io"},
		},
		"io only available, not enabled, in kubepods.slice: named": {
			kubepods: "kubepods.slice",
			subtree:  map[string]string{"/": "cpu io memory", "/kubepods.slice": "cpu memory pids"},
			wantErr:  "the io controller is not enabled in ROOT/kubepods.slice",
		},
		"io not enabled at the root: the root named": {
			kubepods: "kubepods",
			subtree:  map[string]string{"/": "memory", "/kubepods": "io"},
			wantErr:  "the io controller is not enabled in ROOT (",
		},
		"no kubepods cgroup yet: nothing to check": {
			subtree: map[string]string{"/": ""},
		},
	} {
		t.Run(name, func(t *testing.T) {
			root := newRoot(t, "v2")
			h, err := Open(root, Auto)
			if err != nil {
				t.Fatal(err)
			}
			if tc.kubepods != "" {
				if err := os.MkdirAll(h.Join(tc.kubepods), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			for p, v := range tc.subtree {
				write(t, filepath.Join(h.Join(p), "cgroup.subtree_control"), v+"\n")
			}
			err = h.CheckIOEnabled()
			want := strings.ReplaceAll(tc.wantErr, "ROOT", root)
			switch {
			case want == "" && err != nil:
				t.Errorf("CheckIOEnabled: %v", err)
			case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
				t.Errorf("CheckIOEnabled: %v, want an error containing %q", err, want)
			}
		})
	}
	t.Run("cgroup v1: nothing to check", func(t *testing.T) {
		h, err := Open(newRoot(t, "v1"), Auto)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(h.Join("kubepods"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := h.CheckIOEnabled(); err != nil {
			t.Errorf("v1: %v", err)
		}
	})
}
