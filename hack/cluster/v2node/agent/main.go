// Command agent is the guest command agent of the cgroup v2 node kind
// (hack/cluster, NODE=v2): a small HTTP server inside the VM through which
// the host runs commands, reads and writes files, starts detached programs
// and makes HTTP and TLS probes from the guest's network as root. It listens on the guest's port 2222,
// which qemu forwards to a port on the host's 127.0.0.1 only, and refuses
// any request without the image's random token (/etc/kdg-agent/token) as
// "Authorization: Bearer TOKEN". It is built statically when the image is
// built and started by systemd (kdg-agent.service).
package main

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// RunRequest is POST /run: argv[0] looked up in PATH, env added.
type RunRequest struct {
	Argv []string `json:"argv"`
	Env  []string `json:"env,omitempty"`
}

// RunResponse is /run's answer: combined output and exit code (-1 and
// Error when it could not run).
type RunResponse struct {
	Output []byte `json:"output"`
	Exit   int    `json:"exit"`
	Error  string `json:"error,omitempty"`
}

// StartRequest is POST /start: a detached program (own process group,
// outliving the agent), output appended to Log.
type StartRequest struct {
	Argv []string `json:"argv"`
	Env  []string `json:"env,omitempty"`
	Log  string   `json:"log"`
	Dir  string   `json:"dir,omitempty"`
}

// StartResponse is /start's answer.
type StartResponse struct {
	PID       int    `json:"pid"`
	StartTime string `json:"startTime"` // field 22 of /proc/PID/stat
}

// HTTPResponse is GET /http's answer: the guest loopback probe's result.
type HTTPResponse struct {
	Status int    `json:"status"`
	Body   []byte `json:"body"`
}

func main() {
	addr := flag("KDG_AGENT_ADDR", ":2222")
	tokenFile := flag("KDG_AGENT_TOKEN_FILE", "/etc/kdg-agent/token")
	b, err := os.ReadFile(tokenFile)
	if err != nil {
		log.Fatalf("token: %v", err)
	}
	token := strings.TrimSpace(string(b))
	if len(token) < 32 {
		log.Fatalf("token in %s is too short", tokenFile)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	mux.HandleFunc("POST /run", handleRun)
	mux.HandleFunc("GET /file", handleRead)
	mux.HandleFunc("PUT /file", handleWrite)
	mux.HandleFunc("POST /start", handleStart)
	mux.HandleFunc("GET /freeports", handleFreePorts)
	mux.HandleFunc("GET /http", handleHTTP)
	mux.HandleFunc("GET /tls", handleTLS)
	auth := func(w http.ResponseWriter, r *http.Request) {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || subtle.ConstantTimeCompare([]byte(got), []byte(token)) != 1 {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		mux.ServeHTTP(w, r)
	}
	log.Printf("listening on %s", addr)
	log.Fatal((&http.Server{Addr: addr, Handler: http.HandlerFunc(auth), ReadHeaderTimeout: 10 * time.Second}).ListenAndServe())
}

func flag(env, def string) string {
	if v := os.Getenv(env); v != "" {
		return v
	}
	return def
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	if err := json.NewDecoder(r.Body).Decode(v); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return false
	}
	return true
}

func reply(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func handleRun(w http.ResponseWriter, r *http.Request) {
	var req RunRequest
	if !decode(w, r, &req) {
		return
	}
	if len(req.Argv) == 0 {
		http.Error(w, "empty argv", http.StatusBadRequest)
		return
	}
	// The request's context ends when the host gives up: the command is
	// killed then.
	cmd := exec.CommandContext(r.Context(), req.Argv[0], req.Argv[1:]...)
	cmd.Env = append(os.Environ(), req.Env...)
	out, err := cmd.CombinedOutput()
	resp := RunResponse{Output: out}
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		resp.Exit = exit.ExitCode()
		if resp.Exit < 0 {
			resp.Error = err.Error()
		}
	case err != nil:
		resp.Exit, resp.Error = -1, err.Error()
	}
	reply(w, resp)
}

func handleRead(w http.ResponseWriter, r *http.Request) {
	b, err := os.ReadFile(r.URL.Query().Get("path"))
	if errors.Is(err, fs.ErrNotExist) {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Write(b)
}

func handleWrite(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Query().Get("path")
	perm, err := strconv.ParseUint(r.URL.Query().Get("perm"), 8, 32)
	if err != nil || p == "" {
		http.Error(w, "want path and perm (octal)", http.StatusBadRequest)
		return
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	// Written to a temporary file and renamed: a binary that runs may be
	// replaced, and a reader never sees half a file.
	tmp := p + ".kdg-agent-tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, os.FileMode(perm))
	if err == nil {
		_, err = io.Copy(f, r.Body)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err == nil {
		err = os.Chmod(tmp, os.FileMode(perm))
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err != nil {
		os.Remove(tmp)
		http.Error(w, err.Error(), http.StatusInternalServerError)
	}
}

func handleStart(w http.ResponseWriter, r *http.Request) {
	var req StartRequest
	if !decode(w, r, &req) {
		return
	}
	if len(req.Argv) == 0 || req.Log == "" {
		http.Error(w, "want argv and log", http.StatusBadRequest)
		return
	}
	if err := os.MkdirAll(filepath.Dir(req.Log), 0o755); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	logf, err := os.OpenFile(req.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer logf.Close()
	cmd := exec.Command(req.Argv[0], req.Argv[1:]...)
	cmd.Env = append(os.Environ(), req.Env...)
	cmd.Stdout, cmd.Stderr, cmd.Dir = logf, logf, req.Dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	pid := cmd.Process.Pid
	go cmd.Wait() // reap
	reply(w, StartResponse{PID: pid, StartTime: startTime(pid)})
}

// startTime is field 22 of /proc/PID/stat (after the command's parentheses).
func startTime(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return ""
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return ""
	}
	return f[19]
}

func handleFreePorts(w http.ResponseWriter, r *http.Request) {
	n, err := strconv.Atoi(r.URL.Query().Get("n"))
	if err != nil || n < 1 || n > 100 {
		http.Error(w, "want n in 1..100", http.StatusBadRequest)
		return
	}
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	reply(w, ports)
}

// handleHTTP GETs http://<addr><path> from the guest's network (addr is
// host:port: a loopback probe, a Service's ClusterIP), a new connection
// each time: one opened before kube-proxy wrote a Service's rules is not
// NATed, and conntrack keeps it so.
func handleHTTP(w http.ResponseWriter, r *http.Request) {
	addr := r.URL.Query().Get("addr")
	if _, _, err := net.SplitHostPort(addr); err != nil {
		http.Error(w, "want addr=host:port: "+err.Error(), http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+r.URL.Query().Get("path"), nil)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	resp, err := noKeepAlive.Do(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	reply(w, HTTPResponse{Status: resp.StatusCode, Body: b})
}

var noKeepAlive = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}

// handleTLS dials addr over TLS from the guest's network with SNI sni and
// returns the DER of the certificate the server presents, unverified (the
// caller compares it with what it expects).
func handleTLS(w http.ResponseWriter, r *http.Request) {
	addr, sni := r.URL.Query().Get("addr"), r.URL.Query().Get("sni")
	if _, _, err := net.SplitHostPort(addr); err != nil {
		http.Error(w, "want addr=host:port: "+err.Error(), http.StatusBadRequest)
		return
	}
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 3 * time.Second}, "tcp", addr, &tls.Config{ServerName: sni, InsecureSkipVerify: true})
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer conn.Close()
	reply(w, conn.ConnectionState().PeerCertificates[0].Raw)
}
