package cluster

import (
	"reflect"
	"testing"
)

func TestRuleFields(t *testing.T) {
	for _, tc := range []struct {
		name, line string
		want       []string
	}{
		{"plain words are split on spaces", "-A INPUT -j KUBE-FIREWALL", []string{"-A", "INPUT", "-j", "KUBE-FIREWALL"}},
		{"a quoted comment is one argument without its quotes",
			`-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`,
			[]string{"-A", "PREROUTING", "-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"}},
		{"an escaped quote inside quotes is kept", `--comment "a \"b\" c"`, []string{"--comment", `a "b" c`}},
		{"an empty quoted string is an argument", `--comment ""`, []string{"--comment", ""}},
		{"an empty line has no arguments", "", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := ruleFields(tc.line); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("ruleFields(%q) = %q, want %q", tc.line, got, tc.want)
			}
		})
	}
}
