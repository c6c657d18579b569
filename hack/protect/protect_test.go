package protect

import (
	"strings"
	"testing"
	"time"
)

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{[]float64{3, 1, 2}, 2}, {[]float64{4, 1, 3, 2}, 2.5}, {[]float64{7}, 7}} {
		if got := Median(c.in); got != c.want {
			t.Errorf("Median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

// Table ends with the two lines a script reads, the ratios of the median p99s.
func TestTableEndsWithTheRatios(t *testing.T) {
	us := time.Microsecond
	var rs []Result
	for _, p99 := range [][3]time.Duration{{100 * us, 400 * us, 110 * us}, {300 * us, 900 * us, 90 * us}, {200 * us, 600 * us, 240 * us}} {
		for i, ph := range Phases {
			rs = append(rs, Result{Phase: ph, VictimIOPS: 1000, P99: p99[i]})
		}
	}
	lines := strings.Split(strings.TrimRight(Table(rs), "\n"), "\n")
	got := strings.Join(lines[len(lines)-2:], "\n")
	want := "victim p99 protected/alone 0.55\nvictim p99 unprotected/alone 3.00"
	if got != want {
		t.Errorf("last two lines:\n%s\nwant\n%s", got, want)
	}
	if b := Bars(Summarize(rs), 40); !strings.Contains(b, strings.Repeat("█", 40)+" 600µs") {
		t.Errorf("the unprotected bar is not the longest:\n%s", b)
	}
}

// With the capped phase and two second victims, their ratios come first,
// the node's then the Guaranteed pod's, and the pod victim's
// unprotected/alone is still the last line.
func TestTableWithTheNodeCapEndsWithUnprotected(t *testing.T) {
	ms := time.Millisecond
	var rs []Result
	for i, ph := range []Phase{Alone, Unprotected, Protected, Capped} {
		p99 := []time.Duration{2 * ms, 20 * ms, 3 * ms, 40 * ms}[i]
		node := []time.Duration{2 * ms, 10 * ms, 2 * ms, 1 * ms}[i]
		guar := []time.Duration{2 * ms, 8 * ms, 2 * ms, 4 * ms}[i]
		rs = append(rs, Result{Phase: ph, Round: 1, VictimIOPS: 500, P99: p99,
			Besides: map[Beside]Latency{Guaranteed: {500, guar}, OnNode: {500, node}}})
	}
	lines := strings.Split(strings.TrimRight(Table(rs), "\n"), "\n")
	got := strings.Join(lines[len(lines)-9:], "\n")
	want := strings.Join([]string{
		"node victim p99 protected/alone 1.00", "node victim p99 capped/alone 0.50", "node victim p99 unprotected/alone 5.00",
		"guaranteed victim p99 protected/alone 1.00", "guaranteed victim p99 capped/alone 2.00", "guaranteed victim p99 unprotected/alone 4.00",
		"victim p99 protected/alone 1.50", "victim p99 capped/alone 20.00", "victim p99 unprotected/alone 10.00"}, "\n")
	if got != want {
		t.Errorf("last nine lines:\n%s\nwant\n%s", got, want)
	}
	if !strings.Contains(lines[0], "node p99") || !strings.Contains(lines[0], "guar p99") || strings.Index(lines[0], "node") > strings.Index(lines[0], "guar") {
		t.Errorf("no node then guaranteed victim columns in the header: %s", lines[0])
	}
}
