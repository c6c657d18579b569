package app

import (
	"reflect"
	"strings"
	"testing"
)

func env(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func TestParseOptions(t *testing.T) {
	tests := map[string]struct {
		args  []string
		env   map[string]string
		check func(t *testing.T, o *Options)
		// wantErr are substrings the error must contain. The error ends with
		// the usage, which names every flag and variable: a bare name proves
		// nothing.
		wantErr []string
	}{
		"uses the SPEC's defaults when nothing is set": {
			check: func(t *testing.T, o *Options) {
				if o.Port != 9443 || o.MetricsBindAddress != ":8080" || o.HealthProbeAddress != ":8081" || o.CertDir != DefaultCertDir {
					t.Errorf("server options = %+v", o)
				}
				wantSettings(t, o, "iops=500")
				if got := strings.Join(o.Resolve.ExcludeKeywords, ","); got != DefaultExcludeKeywords {
					t.Errorf("keywords = %q", got)
				}
				if !reflect.DeepEqual(o.Resolve.ExcludeNamespaces, []string{"kube-system"}) || o.Resolve.ExcludePodSelector != nil {
					t.Errorf("exclusions = %v, %v", o.Resolve.ExcludeNamespaces, o.Resolve.ExcludePodSelector)
				}
				if o.PolicyWritesPerSecond != 20 || o.LeaderElectionNamespace != "" {
					t.Errorf("policy controller: %v writes/s, Lease namespace %q; want 20 and empty", o.PolicyWritesPerSecond, o.LeaderElectionNamespace)
				}
			},
		},
		"lets POLICY_WRITES_PER_SECOND set the policy controller's write rate, and the flag beat it": {
			env:  map[string]string{"POLICY_WRITES_PER_SECOND": "2.5"},
			args: []string{"--leader-election-namespace=kdg"},
			check: func(t *testing.T, o *Options) {
				if o.PolicyWritesPerSecond != 2.5 || o.LeaderElectionNamespace != "kdg" {
					t.Errorf("policy controller: %v writes/s, Lease namespace %q; want 2.5 and kdg", o.PolicyWritesPerSecond, o.LeaderElectionNamespace)
				}
				o, err := ParseOptions([]string{"--policy-writes-per-second=100"}, env(map[string]string{"POLICY_WRITES_PER_SECOND": "2.5"}))
				if err != nil || o.PolicyWritesPerSecond != 100 {
					t.Errorf("flag 100 over env 2.5: %v writes/s, err %v", o.PolicyWritesPerSecond, err)
				}
			},
		},
		"names a write rate that is not above 0": {
			env:     map[string]string{"POLICY_WRITES_PER_SECOND": "0"},
			wantErr: []string{"invalid value 0 for --policy-writes-per-second / POLICY_WRITES_PER_SECOND: want a number above 0"},
		},
		"names a write rate that is not a number": {
			args:    []string{"--policy-writes-per-second=fast"},
			wantErr: []string{`invalid value "fast" for flag -policy-writes-per-second`},
		},
		"lets environment variables set the defaults and exclusions": {
			env: map[string]string{
				"CONTAINER_IOPS_LIMIT": "800", "CONTAINER_READ_IOPS_LIMIT": "unlimited", "CONTAINER_WRITE_BPS_LIMIT": "50Mi",
				"EXCLUDE_KEYWORDS": "sidecar, ,proxy", "EXCLUDE_NAMESPACES": "kube-system,monitoring", "EXCLUDE_POD_SELECTOR": "app in (db),tier!=infra",
			},
			check: func(t *testing.T, o *Options) {
				wantSettings(t, o, "iops=800 read-iops=unlimited write-bps=50Mi")
				if !reflect.DeepEqual(o.Resolve.ExcludeKeywords, []string{"sidecar", "proxy"}) {
					t.Errorf("keywords = %q", o.Resolve.ExcludeKeywords)
				}
				if !reflect.DeepEqual(o.Resolve.ExcludeNamespaces, []string{"kube-system", "monitoring"}) {
					t.Errorf("namespaces = %q", o.Resolve.ExcludeNamespaces)
				}
				if o.Resolve.ExcludePodSelector.String() != "app in (db),tier!=infra" {
					t.Errorf("selector = %v", o.Resolve.ExcludePodSelector)
				}
			},
		},
		"lets a flag override the environment": {
			args: []string{"--container-iops-limit=100", "--port=10250", "--cert-dir=/certs", "--exclude-keywords="},
			env:  map[string]string{"CONTAINER_IOPS_LIMIT": "800"},
			check: func(t *testing.T, o *Options) {
				wantSettings(t, o, "iops=100")
				if o.Port != 10250 || o.CertDir != "/certs" || len(o.Resolve.ExcludeKeywords) != 0 {
					t.Errorf("options = %+v", o)
				}
			},
		},
		"names the environment variable holding a bad limit": {
			env:     map[string]string{"CONTAINER_READ_BPS_LIMIT": "fast"},
			wantErr: []string{`invalid value "fast" for environment variable CONTAINER_READ_BPS_LIMIT`},
		},
		"names the flag holding a bad limit": {
			args:    []string{"--container-write-iops-limit=-1"},
			wantErr: []string{`invalid value "-1" for flag -container-write-iops-limit`},
		},
		"names a bad pod selector": {
			env:     map[string]string{"EXCLUDE_POD_SELECTOR": "app in (db"},
			wantErr: []string{`invalid value "app in (db" for --exclude-pod-selector / EXCLUDE_POD_SELECTOR`},
		},
		"rejects an unknown flag": {
			args:    []string{"--iops=5"},
			wantErr: []string{"flag provided but not defined: -iops"},
		},
		"rejects a port out of range": {
			args:    []string{"--port=70000"},
			wantErr: []string{"invalid value 70000 for --port"},
		},
		"reports every bad setting at once": {
			env: map[string]string{"CONTAINER_IOPS_LIMIT": "x", "CONTAINER_WRITE_IOPS_LIMIT": "y"},
			wantErr: []string{
				`invalid value "x" for environment variable CONTAINER_IOPS_LIMIT`,
				`invalid value "y" for environment variable CONTAINER_WRITE_IOPS_LIMIT`,
			},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			o, err := ParseOptions(tc.args, env(tc.env))
			if tc.wantErr != nil {
				for _, want := range tc.wantErr {
					if err == nil || !strings.Contains(err.Error(), want) {
						t.Fatalf("err = %v, want it to contain %q", err, want)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, o)
		})
	}
}

func wantSettings(t *testing.T, o *Options, want string) {
	t.Helper()
	if got := o.Resolve.Defaults.String(); got != want {
		t.Errorf("defaults = %q, want %q", got, want)
	}
}
