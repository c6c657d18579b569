package resolve

import (
	"strings"
	"testing"

	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// FuzzParseContainerValue: parsing a per-container annotation never panics;
// a value it accepts sets only known keys, and one it rejects is explained
// with at least one problem.
func FuzzParseContainerValue(f *testing.F) {
	for _, s := range []string{
		"read-iops=800,write-iops=200,read-bps=50Mi", "iops=1", "", ",", "=", "iops=", "iops=1,iops=2",
		"bps=1e8666666660", " write-bps = 1Gi ", "speed=9", "read-iops=unlimited", "a=b=c",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		s, problems := ParseContainerValue(v)
		if len(problems) > 0 {
			for _, p := range problems {
				if p == "" {
					t.Fatalf("empty problem for %q", v)
				}
			}
			return
		}
		n := 0
		for _, k := range limits.Keys {
			if val, ok := s.Get(k); ok {
				n++
				if k.IsIOPS() && val > limits.MaxIOPS {
					t.Fatalf("%q set %s=%d above MaxIOPS", v, k, val)
				}
				if !strings.Contains(v, k.String()) {
					t.Fatalf("%q set %s, which it does not mention", v, k)
				}
			}
		}
		if n == 0 {
			t.Fatalf("%q was accepted but sets nothing", v)
		}
	})
}
