package connect

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/kubediskguard/kubediskguard/applier/runtime/containerd"
	"github.com/kubediskguard/kubediskguard/hack/runtimetest"
)

// TestRealRuntime connects, by kind and by auto-detection, to a private
// dockerd and the private containerd it uses, as on a Docker node whose
// containerd is the system's.
func TestRealRuntime(t *testing.T) {
	d := runtimetest.StartDockerd(t)
	h := runtimetest.Hierarchy(t)
	ctrd := d.Containerd.Socket
	dockerSock := strings.TrimPrefix(d.Host, "unix://")
	nowhere := filepath.Join(t.TempDir(), "nothing.sock")

	for _, tc := range []struct {
		name, kind, socket string
		// the default sockets that auto tries
		defaultContainerd, defaultDocker string
		// k8sNamespace creates containerd's k8s.io namespace first
		k8sNamespace bool
		want         string // a runtime's name, or an error's text
		wantErr      bool
	}{
		{name: "containerd by kind", kind: Containerd, socket: ctrd, want: Containerd},
		{name: "docker by kind", kind: Docker, socket: d.Host, want: Docker},
		{name: "docker by kind, a socket path", kind: Docker, socket: dockerSock, want: Docker},
		{name: "auto on a containerd socket", kind: Auto, socket: ctrd, want: Containerd},
		{name: "auto on a containerd socket as a unix:// address", kind: Auto, socket: "unix://" + ctrd, want: Containerd},
		{name: "auto on a docker socket", kind: Auto, socket: dockerSock, want: Docker},
		{name: "auto on a docker address", kind: Auto, socket: d.Host, want: Docker},
		{
			name: "auto on default sockets: docker, when containerd has no Kubernetes namespace",
			kind: Auto, defaultContainerd: ctrd, defaultDocker: d.Host, want: Docker,
		},
		{
			name: "auto on default sockets: containerd alone, even without its namespace yet",
			kind: Auto, defaultContainerd: ctrd, defaultDocker: "unix://" + nowhere, want: Containerd,
		},
		{
			name: "auto on default sockets: containerd, when it has the Kubernetes namespace",
			kind: Auto, defaultContainerd: ctrd, defaultDocker: d.Host, k8sNamespace: true, want: Containerd,
		},
		{
			name: "auto on default sockets: docker alone",
			kind: Auto, defaultContainerd: nowhere, defaultDocker: d.Host, want: Docker,
		},
		{
			name: "auto, nothing answers: the error names both sockets",
			kind: Auto, defaultContainerd: nowhere, defaultDocker: "unix://" + nowhere + "2",
			want: "no container runtime answers (tried containerd at " + nowhere + ", then docker at unix://" + nowhere + "2)", wantErr: true,
		},
		{name: "containerd by kind on a docker socket", kind: Containerd, socket: dockerSock, want: "containerd at " + dockerSock, wantErr: true},
		{name: "docker by kind on a containerd socket", kind: Docker, socket: ctrd, want: "docker at unix://" + ctrd, wantErr: true},
		{name: "an unknown kind", kind: "cri-o", want: `container runtime "cri-o": want auto, containerd or docker`, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.k8sNamespace {
				ctx := namespaces.WithNamespace(context.Background(), containerd.DefaultNamespace)
				err := d.Containerd.Client.NamespaceService().Create(ctx, containerd.DefaultNamespace, nil)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() {
					if err := d.Containerd.Client.NamespaceService().Delete(ctx, containerd.DefaultNamespace); err != nil {
						t.Error(err)
					}
				})
			}
			start := time.Now()
			rt, err := open(t.Context(), tc.kind, tc.socket, "", h, tc.defaultContainerd, tc.defaultDocker)
			t.Logf("took %s", time.Since(start).Round(time.Microsecond))
			if tc.wantErr {
				if err == nil {
					rt.Close()
					t.Fatalf("got runtime %s, want an error containing %q", rt.Name(), tc.want)
				}
				if !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("error %q does not contain %q", err, tc.want)
				}
				t.Logf("error: %v", err)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer rt.Close()
			if rt.Name() != tc.want {
				t.Errorf("got runtime %s, want %s", rt.Name(), tc.want)
			}
			if _, err := rt.List(t.Context()); err != nil {
				t.Errorf("List: %v", err)
			}
		})
	}
}
