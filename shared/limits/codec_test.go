package limits

import (
	"encoding/json"
	"reflect"
	"testing"
)

func TestEncodeMatchesTheContract(t *testing.T) {
	r := Resolved{"app": {ReadIOPS: 500, WriteIOPS: 500, WriteBPS: 52428800}}
	want := `{"app":{"readIOPS":500,"writeIOPS":500,"readBPS":0,"writeBPS":52428800}}`
	if got := r.Encode(); got != want {
		t.Fatalf("Encode() = %s, want %s", got, want)
	}
}

func TestEncodeIsSortedAndEqualToEncodingJSON(t *testing.T) {
	r := Resolved{
		"web":     {ReadIOPS: 1, WriteIOPS: 2, ReadBPS: 3, WriteBPS: 4},
		"app":     {},
		"init-db": {ReadIOPS: 4294967295, WriteBPS: 1 << 62},
		"we\"ird": {ReadIOPS: 9}, // not a valid container name, but must stay valid JSON
		"ünï\n":   {WriteIOPS: 1},
	}
	std, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.Encode(); got != string(std) {
		t.Fatalf("Encode() = %s\nencoding/json = %s", got, std)
	}
	if got := (Resolved{}).Encode(); got != "{}" {
		t.Fatalf("empty Encode() = %s", got)
	}
}

func TestDecodeResolved(t *testing.T) {
	tests := map[string]struct {
		in      string
		want    Resolved
		wantErr bool
	}{
		"decodes what Encode wrote": {in: `{"app":{"readIOPS":500,"writeIOPS":500,"readBPS":0,"writeBPS":52428800}}`,
			want: Resolved{"app": {ReadIOPS: 500, WriteIOPS: 500, WriteBPS: 52428800}}},
		"decodes an empty object":           {in: `{}`, want: Resolved{}},
		"reads missing dimensions as zero":  {in: `{"a":{"readIOPS":7}}`, want: Resolved{"a": {ReadIOPS: 7}}},
		"ignores fields it does not know":   {in: `{"a":{"readIOPS":7,"future":1}}`, want: Resolved{"a": {ReadIOPS: 7}}},
		"rejects null":                      {in: `null`, wantErr: true},
		"rejects a JSON array":              {in: `[]`, wantErr: true},
		"rejects garbage":                   {in: `{"a":`, wantErr: true},
		"rejects a negative value":          {in: `{"a":{"readIOPS":-1}}`, wantErr: true},
		"rejects a fractional value":        {in: `{"a":{"readIOPS":1.5}}`, wantErr: true},
		"rejects IOPS above the kernel max": {in: `{"a":{"writeIOPS":4294967296}}`, wantErr: true},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := DecodeResolved(tc.in)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("DecodeResolved(%s) = %v, want an error", tc.in, got)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("DecodeResolved(%s) = %v, %v; want %v", tc.in, got, err, tc.want)
			}
		})
	}
}

func FuzzResolvedRoundTrip(f *testing.F) {
	f.Add("app", uint64(500), uint64(500), uint64(0), uint64(52428800))
	f.Add("", uint64(0), uint64(0), uint64(0), uint64(0))
	f.Add("x\"\\\x00é", uint64(4294967295), uint64(1), uint64(1<<63), uint64(1<<64-1))
	f.Fuzz(func(t *testing.T, name string, ri, wi, rb, wb uint64) {
		in := Resolved{name: {ReadIOPS: ri % (MaxIOPS + 1), WriteIOPS: wi % (MaxIOPS + 1), ReadBPS: rb, WriteBPS: wb}}
		enc := in.Encode()
		if !json.Valid([]byte(enc)) {
			t.Fatalf("Encode() wrote invalid JSON: %s", enc)
		}
		out, err := DecodeResolved(enc)
		if err != nil {
			t.Fatalf("DecodeResolved(%s): %v", enc, err)
		}
		// encoding/json replaces invalid UTF-8 in names; compare through it.
		var want Resolved
		std, _ := json.Marshal(in)
		_ = json.Unmarshal(std, &want)
		if !reflect.DeepEqual(out, want) {
			t.Fatalf("round trip of %v gave %v", want, out)
		}
	})
}
