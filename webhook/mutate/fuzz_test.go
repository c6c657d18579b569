package mutate

import (
	"context"
	"encoding/json"
	"testing"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	admissionv1 "k8s.io/api/admission/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// FuzzHandle feeds the admission entry point arbitrary pod bytes and
// annotation values. It never panics; an allowed response's patch applies to
// the request's pod and leaves a resolved annotation that decodes; a denial
// carries a message.
func FuzzHandle(f *testing.F) {
	seed, _ := json.Marshal(realisticPod())
	f.Add(seed, "800", "app", "read-iops=5,write-bps=1Mi", true)
	f.Add(seed, "garbage", "nope", "x=1", false)
	f.Add([]byte(`{"metadata":{"annotations":null},"spec":{"containers":[{"name":"a"}]}}`), "0", "a", "iops=unlimited", true)
	f.Add([]byte(`{"spec":{}}`), "1e99", "", "", false)
	f.Add([]byte(`not json`), "", "", "", true)
	f.Add([]byte(`{"metadata":{"name":"p","annotations":{"kubediskguard.io/limits":"forged"}},"spec":{"containers":[{"name":"app","image":"x"},{"name":"app","image":"y"}]}}`), "5", "app", "iops=1", true)

	h := testHandler(namespaces())
	wh := &admission.Webhook{Handler: h, RecoverPanic: ptr.To(false)} // a panic fails the fuzz run
	f.Fuzz(func(t *testing.T, raw []byte, podIOPS, ctr, ctrValue string, create bool) {
		// Put the fuzzed annotations into the pod when it is a JSON object.
		var obj map[string]any
		if json.Unmarshal(raw, &obj) == nil && obj != nil {
			md, _ := obj["metadata"].(map[string]any)
			if md == nil {
				md = map[string]any{}
				obj["metadata"] = md
			}
			md["annotations"] = map[string]any{limits.Prefix + "iops": podIOPS, limits.ContainerAnnotationPrefix + ctr: ctrValue}
			raw, _ = json.Marshal(obj)
		}
		op := admissionv1.Update
		if create {
			op = admissionv1.Create
		}
		req := podRequest(t, op, "team-a", basePod(nil))
		req.Object = runtime.RawExtension{Raw: raw}
		resp := wh.Handle(context.Background(), req)
		if !resp.Allowed {
			if resp.Result == nil || resp.Result.Message == "" {
				t.Fatalf("denied without a message: %+v", resp.AdmissionResponse)
			}
			return
		}
		if len(resp.Patch) == 0 {
			return
		}
		patch, err := jsonpatch.DecodePatch(resp.Patch)
		if err != nil {
			t.Fatalf("bad patch %s: %v", resp.Patch, err)
		}
		out, err := patch.Apply(raw)
		if err != nil {
			t.Fatalf("patch %s does not apply to %s: %v", resp.Patch, raw, err)
		}
		var patched struct {
			Metadata struct {
				Annotations map[string]string `json:"annotations"`
			} `json:"metadata"`
		}
		if err := json.Unmarshal(out, &patched); err != nil {
			t.Fatalf("patched pod is not JSON: %v", err)
		}
		if _, err := limits.DecodeResolved(patched.Metadata.Annotations[limits.ResolvedAnnotation]); err != nil {
			t.Fatalf("patched annotation does not decode: %v", err)
		}
	})
}
