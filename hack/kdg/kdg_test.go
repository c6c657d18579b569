package kdg

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// fioLog is a container log holding one fio run that started at start.
func fioLog(start time.Time) string {
	return fmt.Sprintf("=== fio run 1\n{\"timestamp_ms\": %d, \"jobs\": [{\"error\": 0, \"job_runtime\": 1000, \"read\": {\"iops\": 50}, \"write\": {\"iops\": 40}}]}\n=== end of fio run 1\n",
		start.Add(time.Second).UnixMilli())
}

// logServer serves the pod log GET as the apiserver does, failing the
// first fails requests with status and a body that is not a Status.
func logServer(t *testing.T, fails int32, status int, log string) (kubernetes.Interface, *atomic.Int32) {
	t.Helper()
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasSuffix(r.URL.Path, "/pods/p/log") {
			http.NotFound(w, r)
			return
		}
		if n.Add(1) <= fails {
			http.Error(w, "unknown", status)
			return
		}
		fmt.Fprint(w, log)
	}))
	t.Cleanup(srv.Close)
	client, err := kubernetes.NewForConfig(&rest.Config{Host: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	return client, &n
}

func TestNextRun(t *testing.T) {
	since := time.Now().Add(-time.Minute).Truncate(time.Millisecond)
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "p"}}
	for _, tc := range []struct {
		name     string
		fails    int32
		status   int
		wantErr  string
		wantGets int32
	}{
		{name: "a log read the apiserver fails with a server error is asked again", fails: 2, status: http.StatusInternalServerError, wantGets: 3},
		{name: "a pod that is gone ends the wait at once", fails: 100, status: http.StatusNotFound, wantErr: "reading the log of ns/p fio", wantGets: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, gets := logServer(t, tc.fails, tc.status, fioLog(since))
			run, err := NextRun(context.Background(), client, pod, "fio", since, 10*time.Second)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
			} else if err != nil {
				t.Fatal(err)
			} else if run.N != 1 || run.ReadIOPS != 50 || run.WriteIOPS != 40 || !run.Start.Equal(since) {
				t.Errorf("run %+v, want run 1 at %s with read 50 / write 40 IOPS", run, since)
			}
			if got := gets.Load(); got != tc.wantGets {
				t.Errorf("%d log GETs, want %d", got, tc.wantGets)
			}
		})
	}
}
