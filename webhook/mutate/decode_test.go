package mutate

import (
	"encoding/json"
	"reflect"
	"testing"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"

	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// TestResolvedPatchAppliesToTheWholePod applies the patch the way the API
// server does (evanphx/json-patch v4) to whole raw pods and checks that the
// only change is the resolved annotation.
func TestResolvedPatchAppliesToTheWholePod(t *testing.T) {
	const value = `{"app":{"readIOPS":500,"writeIOPS":500,"readBPS":0,"writeBPS":0}}`
	tests := map[string]string{
		"adds annotations to a pod that has none":          `{"metadata":{"name":"p","labels":{"a":"b"}},"spec":{"containers":[{"name":"app"}]}}`,
		"adds annotations where they are null":             `{"metadata":{"name":"p","annotations":null},"spec":{"containers":[{"name":"app"}]}}`,
		"adds the key beside other annotations":            `{"metadata":{"name":"p","annotations":{"x/y":"1","kubediskguard.io/iops":"5"}},"spec":{"containers":[{"name":"app"}]}}`,
		"replaces a forged value":                          `{"metadata":{"name":"p","annotations":{"kubediskguard.io/limits":"{}","z":"2"}},"spec":{"containers":[{"name":"app"}]}}`,
		"creates metadata on a pod that has none":          `{"spec":{"containers":[{"name":"app"}]}}`,
		"keeps an empty annotations object and adds to it": `{"metadata":{"annotations":{}},"spec":{"containers":[{"name":"app"}]}}`,
	}
	for name, raw := range tests {
		t.Run(name, func(t *testing.T) {
			pod, hasMetadata, err := decodePod([]byte(raw))
			if err != nil {
				t.Fatal(err)
			}
			opsJSON, _ := json.Marshal(resolvedPatch(pod, hasMetadata, value))
			patch, err := jsonpatch.DecodePatch(opsJSON)
			if err != nil {
				t.Fatal(err)
			}
			patched, err := patch.Apply([]byte(raw))
			if err != nil {
				t.Fatalf("applying %s: %v", opsJSON, err)
			}
			var want, got map[string]any
			_ = json.Unmarshal([]byte(raw), &want)
			_ = json.Unmarshal(patched, &got)
			md, _ := want["metadata"].(map[string]any)
			if md == nil {
				md = map[string]any{}
				want["metadata"] = md
			}
			ann, _ := md["annotations"].(map[string]any)
			if ann == nil {
				ann = map[string]any{}
				md["annotations"] = ann
			}
			ann[limits.ResolvedAnnotation] = value
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("patch %s gave\n%s\nwant everything unchanged but the annotation", opsJSON, patched)
			}
		})
	}
}
