package mutate

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/kubediskguard/kubediskguard/shared/limits"
	"github.com/kubediskguard/kubediskguard/webhook/resolve"
)

// staticNamespaces is a NamespaceReader over fixed namespaces.
type staticNamespaces map[string]*resolve.Namespace

func (s staticNamespaces) Namespace(_ context.Context, name string) (*resolve.Namespace, error) {
	if ns, ok := s[name]; ok {
		return ns, nil
	}
	return nil, errors.New("namespace not found")
}

type panickingNamespaces struct{}

func (panickingNamespaces) Namespace(context.Context, string) (*resolve.Namespace, error) {
	panic("boom")
}

func testHandler(ns NamespaceReader) *PodLimiter {
	c := &resolve.Config{ExcludeKeywords: []string{"istio-proxy"}, ExcludeNamespaces: []string{"kube-system"}}
	c.Defaults.Set(limits.KeyIOPS, 500)
	return &PodLimiter{Resolver: c, Namespaces: ns}
}

func namespaces() staticNamespaces {
	enabled := map[string]string{limits.EnabledLabel: "true"}
	return staticNamespaces{
		"team-a":   {Name: "team-a", Labels: enabled, Annotations: map[string]string{limits.MaxIOPSAnnotation: "1000"}},
		"team-bad": {Name: "team-bad", Labels: enabled, Annotations: map[string]string{limits.Prefix + "bps": "oops"}},
		"plain":    {Name: "plain"},
	}
}

func podRequest(t testing.TB, op admissionv1.Operation, ns string, p *corev1.Pod) admission.Request {
	t.Helper()
	raw, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	return admission.Request{AdmissionRequest: admissionv1.AdmissionRequest{
		UID:       "uid-1",
		Kind:      metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
		Resource:  metav1.GroupVersionResource{Version: "v1", Resource: "pods"},
		Namespace: ns,
		Operation: op,
		Object:    runtime.RawExtension{Raw: raw},
	}}
}

func basePod(annotations map[string]string) *corev1.Pod {
	return &corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Name: "web", Annotations: annotations},
		Spec: corev1.PodSpec{Containers: []corev1.Container{
			{Name: "app", Image: "example/app"},
			{Name: "istio-proxy", Image: "istio/proxyv2"},
		}},
	}
}

// patchedAnnotation applies the response's patch to the request's pod the
// way the API server does, and returns the resolved annotation it then has;
// ok is false when there is no patch.
func patchedAnnotation(t *testing.T, req admission.Request, resp admission.Response) (string, bool) {
	t.Helper()
	if len(resp.Patches) == 0 {
		return "", false
	}
	ops, err := json.Marshal(resp.Patches)
	if err != nil {
		t.Fatal(err)
	}
	patch, err := jsonpatch.DecodePatch(ops)
	if err != nil {
		t.Fatal(err)
	}
	out, err := patch.Apply(req.Object.Raw)
	if err != nil {
		t.Fatalf("patch %s does not apply: %v", ops, err)
	}
	var pod corev1.Pod
	if err := json.Unmarshal(out, &pod); err != nil {
		t.Fatal(err)
	}
	v, ok := pod.Annotations[limits.ResolvedAnnotation]
	return v, ok
}

func TestHandle(t *testing.T) {
	stamped := `{"app":{"readIOPS":500,"writeIOPS":500,"readBPS":0,"writeBPS":0}}`
	tests := map[string]struct {
		req          func(t testing.TB) admission.Request
		wantAllowed  bool
		wantCode     int32
		wantPatch    string // the resolved annotation the patch writes; "" for no patch
		wantMessage  string
		wantWarnings []string
	}{
		"stamps a new pod in an enabled namespace and warns about the bad namespace annotation": {
			req: func(t testing.TB) admission.Request {
				return podRequest(t, admissionv1.Create, "team-bad", basePod(nil))
			},
			wantAllowed:  true,
			wantPatch:    stamped,
			wantWarnings: []string{`namespace "team-bad": ignoring invalid annotation kubediskguard.io/bps="oops"`},
		},
		"stamps a pod that has only a generateName, using the request's namespace": {
			req: func(t testing.TB) admission.Request {
				p := basePod(nil)
				p.Name, p.GenerateName = "", "web-7d9f-"
				return podRequest(t, admissionv1.Create, "team-a", p)
			},
			wantAllowed: true,
			wantPatch:   stamped,
		},
		"replaces a forged resolved annotation": {
			req: func(t testing.TB) admission.Request {
				return podRequest(t, admissionv1.Create, "team-a", basePod(map[string]string{limits.ResolvedAnnotation: `{"app":{"readIOPS":0}}`}))
			},
			wantAllowed: true,
			wantPatch:   stamped,
		},
		"re-resolves on update and clamps with a warning": {
			req: func(t testing.TB) admission.Request {
				return podRequest(t, admissionv1.Update, "team-a", basePod(map[string]string{
					limits.ResolvedAnnotation: stamped, limits.Prefix + "write-iops": "5000"}))
			},
			wantAllowed:  true,
			wantPatch:    `{"app":{"readIOPS":500,"writeIOPS":1000,"readBPS":0,"writeBPS":0}}`,
			wantWarnings: []string{`container "app": clamped to the ceilings of namespace "team-a": write-iops 5000 to 1000`},
		},
		"sends no patch when the annotation already holds the resolved limits": {
			req: func(t testing.TB) admission.Request {
				return podRequest(t, admissionv1.Update, "team-a", basePod(map[string]string{limits.ResolvedAnnotation: stamped}))
			},
			wantAllowed: true,
		},
		"leaves a pod alone in a namespace that did not opt in": {
			req:         func(t testing.TB) admission.Request { return podRequest(t, admissionv1.Create, "plain", basePod(nil)) },
			wantAllowed: true,
		},
		"lets a pod that is being deleted through untouched": {
			req: func(t testing.TB) admission.Request {
				p := basePod(map[string]string{limits.Prefix + "iops": "bad"})
				p.DeletionTimestamp = ptr.To(metav1.Now())
				return podRequest(t, admissionv1.Update, "team-a", p)
			},
			wantAllowed: true,
		},
		"denies invalid pod annotations as Invalid, naming keys and values": {
			req: func(t testing.TB) admission.Request {
				return podRequest(t, admissionv1.Create, "team-a", basePod(map[string]string{
					limits.Prefix + "read-iops": "-1", limits.ContainerAnnotationPrefix + "app": "speed=9"}))
			},
			wantCode:    http.StatusUnprocessableEntity,
			wantMessage: `Pod "web" is invalid: [metadata.annotations[container.kubediskguard.io/app]: Invalid value: "speed=9": unknown key "speed"`,
		},
		"answers 400 to an object that is not a pod": {
			req: func(t testing.TB) admission.Request {
				r := podRequest(t, admissionv1.Create, "team-a", basePod(nil))
				r.Object.Raw = []byte(`{"spec":{"containers":"nope"}}`)
				return r
			},
			wantCode: http.StatusBadRequest,
		},
		"answers 500 when the namespace cannot be read": {
			req: func(t testing.TB) admission.Request {
				return podRequest(t, admissionv1.Create, "missing", basePod(nil))
			},
			wantCode: http.StatusInternalServerError,
		},
		"ignores deletes": {
			req:         func(t testing.TB) admission.Request { return podRequest(t, admissionv1.Delete, "team-a", basePod(nil)) },
			wantAllowed: true,
		},
	}
	h := testHandler(namespaces())
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			req := tc.req(t)
			resp := h.Handle(context.Background(), req)
			if resp.Allowed != tc.wantAllowed {
				t.Fatalf("Allowed = %v, want %v; result %+v", resp.Allowed, tc.wantAllowed, resp.Result)
			}
			if tc.wantCode != 0 && (resp.Result == nil || resp.Result.Code != tc.wantCode) {
				t.Fatalf("result = %+v, want code %d", resp.Result, tc.wantCode)
			}
			if tc.wantMessage != "" && !strings.Contains(resp.Result.Message, tc.wantMessage) {
				t.Fatalf("message = %q\nwant it to contain %q", resp.Result.Message, tc.wantMessage)
			}
			got, ok := patchedAnnotation(t, req, resp)
			if tc.wantPatch == "" && len(resp.Patches) > 0 {
				t.Fatalf("want no patch, got %+v", resp.Patches)
			}
			if tc.wantPatch != "" && (!ok || got != tc.wantPatch) {
				t.Fatalf("patch writes %q (%v), want %q; patches %+v", got, ok, tc.wantPatch, resp.Patches)
			}
			if len(resp.Warnings) != len(tc.wantWarnings) {
				t.Fatalf("warnings = %q, want %d", resp.Warnings, len(tc.wantWarnings))
			}
			for i, w := range tc.wantWarnings {
				if !strings.Contains(resp.Warnings[i], w) {
					t.Errorf("warning %d = %q, want it to contain %q", i, resp.Warnings[i], w)
				}
			}
		})
	}
}

func TestPanicIsRecoveredIntoAnErrorKeepingTheUID(t *testing.T) {
	wh := testHandler(panickingNamespaces{}).Webhook()
	resp := wh.Handle(context.Background(), podRequest(t, admissionv1.Create, "team-a", basePod(nil)))
	if resp.Allowed || resp.Result == nil || resp.Result.Code != http.StatusInternalServerError {
		t.Fatalf("response = %+v, want a 500", resp.AdmissionResponse)
	}
	if resp.UID != "uid-1" {
		t.Fatalf("UID = %q, want uid-1", resp.UID)
	}
}
