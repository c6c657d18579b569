package mutate

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	admissionv1 "k8s.io/api/admission/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/kubediskguard/kubediskguard/certs/pki"
)

// BenchmarkLoad sends an open-loop 1,000 requests/s for LOAD_SECONDS (default
// 30) over TLS on loopback to each of two webhook servers built the same way —
// one serving the real handler, one a no-op handler — with the same client,
// and reports the latency percentiles of both and their ratio. The two take
// turns in 5-second rounds, so that both see the same machine. Run it with
// -benchtime 1x (make bench-load).
func BenchmarkLoad(b *testing.B) {
	seconds := 30
	if s, err := strconv.Atoi(os.Getenv("LOAD_SECONDS")); err == nil && s > 0 {
		seconds = s
	}
	const rate = 1000

	certDir := b.TempDir()
	_, ca, err := pki.WriteNew(certDir, []string{"127.0.0.1"}, time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	noop := &admission.Webhook{Handler: admission.HandlerFunc(func(context.Context, admission.Request) admission.Response {
		return admission.Allowed("")
	})}
	real := testHandler(namespaces()).Webhook()

	req := podRequest(b, admissionv1.Create, "team-a", realisticPod())
	review := admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request:  &req.AdmissionRequest,
	}
	body, err := json.Marshal(review)
	if err != nil {
		b.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca.PEM)
	// Like the API server's webhook client: HTTP/2 (which the server
	// offers), so requests share connections instead of each burst paying
	// for new TLS handshakes.
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: pool},
		ForceAttemptHTTP2: true,
	}}

	logf.SetLogger(logr.Discard())
	noopURL, realURL := serve(b, certDir, noop), serve(b, certDir, real)
	const round = 5 * time.Second
	for b.Loop() {
		var n, l loadResult
		// Warm up connections and caches, then measure in turns.
		runLoad(client, noopURL, body, rate, time.Second)
		runLoad(client, realURL, body, rate, time.Second)
		for range max(1, time.Duration(seconds)*time.Second/round) {
			n.add(runLoad(client, noopURL, body, rate, round))
			l.add(runLoad(client, realURL, body, rate, round))
		}
		if n.errors+l.errors > 0 {
			b.Fatalf("requests failed: noop %d, limiter %d (first: %v)", n.errors, l.errors, firstErr(n, l))
		}
		b.ReportMetric(ms(l.p(50)), "p50-ms")
		b.ReportMetric(ms(l.p(99)), "p99-ms")
		b.ReportMetric(ms(n.p(50)), "noop-p50-ms")
		b.ReportMetric(ms(n.p(99)), "noop-p99-ms")
		b.ReportMetric(float64(l.p(50))/float64(n.p(50)), "p50-ratio")
		b.ReportMetric(float64(len(l.latencies))/l.elapsed.Seconds(), "req/s")
	}
}

type loadResult struct {
	latencies []time.Duration // kept sorted by add
	errors    int
	firstErr  error
	elapsed   time.Duration // from the first request sent to the last answer
}

func (r *loadResult) add(o loadResult) {
	r.latencies = append(r.latencies, o.latencies...)
	slices.Sort(r.latencies)
	r.errors += o.errors
	r.elapsed += o.elapsed
	if r.firstErr == nil {
		r.firstErr = o.firstErr
	}
}

func (r loadResult) p(q int) time.Duration {
	if len(r.latencies) == 0 {
		return 0
	}
	return r.latencies[(len(r.latencies)-1)*q/100]
}

func firstErr(rs ...loadResult) error {
	for _, r := range rs {
		if r.firstErr != nil {
			return r.firstErr
		}
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// runLoad sends rate requests per second for d, each on schedule whether or
// not earlier ones have answered (open loop), and returns the latencies.
func runLoad(client *http.Client, url string, body []byte, rate int, d time.Duration) loadResult {
	n := int(d.Seconds() * float64(rate))
	lat := make([]time.Duration, n)
	errs := make([]error, n)
	interval := time.Second / time.Duration(rate)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		if wait := time.Until(start.Add(time.Duration(i) * interval)); wait > 0 {
			time.Sleep(wait)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			resp, err := client.Post(url, "application/json", bytes.NewReader(body))
			if err == nil {
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err == nil && resp.StatusCode != http.StatusOK {
					err = fmt.Errorf("HTTP %d", resp.StatusCode)
				}
			}
			lat[i], errs[i] = time.Since(t0), err
		}()
	}
	wg.Wait()
	r := loadResult{elapsed: time.Since(start)}
	for i, err := range errs {
		if err != nil {
			r.errors++
			if r.firstErr == nil {
				r.firstErr = err
			}
			continue
		}
		r.latencies = append(r.latencies, lat[i])
	}
	return r
}

// serve starts controller-runtime's webhook server (certwatcher TLS) with the
// hook at Path, and returns its URL.
func serve(b *testing.B, certDir string, hook http.Handler) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	srv := webhook.NewServer(webhook.Options{Host: "127.0.0.1", Port: port, CertDir: certDir})
	srv.Register(Path, hook)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Start(ctx) }()
	b.Cleanup(func() { cancel(); <-done })
	check := srv.StartedChecker()
	for deadline := time.Now().Add(10 * time.Second); check(nil) != nil; {
		if time.Now().After(deadline) {
			b.Fatalf("webhook server on port %d did not start", port)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Sprintf("https://127.0.0.1:%d%s", port, Path)
}
