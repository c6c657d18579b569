package limits

import (
	"math"
	"strconv"
	"strings"
	"testing"
)

func TestParseIOPS(t *testing.T) {
	tests := map[string]struct {
		in      string
		want    uint64
		wantErr bool
	}{
		"accepts a plain integer":                {in: "500", want: 500},
		"reads zero as unlimited":                {in: "0", want: Unlimited},
		"reads the word unlimited as unlimited":  {in: "unlimited", want: Unlimited},
		"accepts unlimited in any case":          {in: "Unlimited", want: Unlimited},
		"trims surrounding space":                {in: " 800 ", want: 800},
		"accepts the kernel's largest IOPS":      {in: strconv.FormatUint(MaxIOPS, 10), want: MaxIOPS},
		"rejects a value above the kernel's max": {in: strconv.FormatUint(MaxIOPS+1, 10), wantErr: true},
		"rejects uint64 overflow":                {in: "18446744073709551616", wantErr: true},
		"rejects a negative number":              {in: "-1", wantErr: true},
		"rejects a fraction":                     {in: "1.5", wantErr: true},
		"rejects a quantity suffix":              {in: "1k", wantErr: true},
		"rejects an explicit plus sign":          {in: "+5", wantErr: true},
		"rejects garbage":                        {in: "lots", wantErr: true},
		"rejects an empty value":                 {in: "", wantErr: true},
		"rejects hex":                            {in: "0x10", wantErr: true},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := ParseIOPS(tc.in)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("ParseIOPS(%q) = %d, want an error", tc.in, got)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseIOPS(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
			}
		})
	}
}

func TestParseBPS(t *testing.T) {
	tests := map[string]struct {
		in      string
		want    uint64
		wantErr bool
	}{
		"accepts plain bytes":                    {in: "1048576", want: 1 << 20},
		"accepts a binary suffix":                {in: "100Mi", want: 100 << 20},
		"accepts a decimal suffix":               {in: "1G", want: 1_000_000_000},
		"accepts a fractional quantity of bytes": {in: "1.5Ki", want: 1536},
		"accepts an exponent":                    {in: "1e6", want: 1_000_000},
		"reads zero as unlimited":                {in: "0", want: Unlimited},
		"reads the word unlimited as unlimited":  {in: "unlimited", want: Unlimited},
		"rejects a fraction of a byte":           {in: "0.5", wantErr: true},
		"rejects milli-bytes":                    {in: "1500m", wantErr: true},
		"rejects a negative quantity":            {in: "-1Mi", wantErr: true},
		"rejects int64 overflow":                 {in: "10E", wantErr: true},
		"rejects garbage":                        {in: "fast", wantErr: true},
		"rejects a huge exponent quickly":        {in: "1e8666666660", wantErr: true},
		"rejects a huge negative exponent":       {in: "1e-8666666660", wantErr: true},
		"rejects a bare huge exponent":           {in: "e8666666660", wantErr: true},
		"rejects a very long value":              {in: "1" + strings.Repeat("0", 70), wantErr: true},
		"rejects an unknown suffix":              {in: "10MB", wantErr: true},
		"rejects an empty value":                 {in: "", wantErr: true},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := ParseBPS(tc.in)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("ParseBPS(%q) = %d, want an error", tc.in, got)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseBPS(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
			}
		})
	}
}

func TestKeys(t *testing.T) {
	for _, k := range Keys {
		got, ok := ParseKey(k.String())
		if !ok || got != k {
			t.Errorf("ParseKey(%q) = %v, %v; want %v", k.String(), got, ok, k)
		}
		if want := "kubediskguard.io/" + k.String(); k.Annotation() != want {
			t.Errorf("%v.Annotation() = %q, want %q", k, k.Annotation(), want)
		}
	}
	if _, ok := ParseKey("max-iops"); ok {
		t.Error("max-iops is a namespace ceiling, not a limit key")
	}
	for _, d := range Dimensions {
		if s := SpecificKey(d); s.String() != d.String() {
			t.Errorf("SpecificKey(%v) = %v", d, s)
		}
		if c := CombinedKey(d); c.IsIOPS() != d.IsIOPS() {
			t.Errorf("CombinedKey(%v) = %v: kinds differ", d, c)
		}
	}
}

func TestLimitsString(t *testing.T) {
	l := Limits{ReadIOPS: 500, WriteBPS: 50 << 20}
	if got, want := l.String(), "read-iops=500 write-iops=unlimited read-bps=unlimited write-bps=50Mi"; got != want {
		t.Fatalf("String() = %q, want %q", got, want)
	}
	if got := FormatValue(false, math.MaxUint64); got != "18446744073709551615" {
		t.Fatalf("FormatValue of a huge value = %q", got)
	}
}

// FuzzParseValue: parsing never panics, and what parses renders back to a
// value that parses to the same number.
func FuzzParseValue(f *testing.F) {
	for _, s := range []string{"500", "0", "unlimited", "100Mi", "1G", "-1", "1.5", "1e3", "10E", "", " 7 ", "0x1"} {
		f.Add(s, true)
		f.Add(s, false)
	}
	f.Fuzz(func(t *testing.T, s string, iops bool) {
		parse := ParseBPS
		if iops {
			parse = ParseIOPS
		}
		v, err := parse(s)
		if err != nil {
			return
		}
		if iops && v > MaxIOPS {
			t.Fatalf("ParseIOPS(%q) = %d above MaxIOPS", s, v)
		}
		back, err := parse(FormatValue(iops, v))
		if err != nil || back != v {
			t.Fatalf("%q parsed to %d, rendered %q, reparsed to %d, %v", s, v, FormatValue(iops, v), back, err)
		}
	})
}
