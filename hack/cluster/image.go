package cluster

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// Image names the harness imports into containerd's k8s.io namespace. Both
// hold one layer: Debian's busybox-static as /bin/busybox plus a link per
// applet. Pods use BusyboxImage with imagePullPolicy: Never; PauseImage is
// the CRI sandbox_image (it runs `sleep inf`).
const (
	BusyboxImage = "kdg.local/busybox:1"
	PauseImage   = "kdg.local/pause:1"
)

// BuildImageTar writes an OCI image-layout tar for name whose root filesystem
// is busybox (from busyboxPath) and whose process is entrypoint+cmd. No
// registry is involved: import it with `ctr -n k8s.io images import`.
func BuildImageTar(out, name, busyboxPath string, entrypoint, cmd []string) error {
	bb, err := os.ReadFile(busyboxPath)
	if err != nil {
		return fmt.Errorf("reading busybox (apt-get install busybox-static): %w", err)
	}
	list, err := exec.Command(busyboxPath, "--list").Output()
	if err != nil {
		return fmt.Errorf("%s --list: %w", busyboxPath, err)
	}
	// The layer: /bin/busybox, /bin/<applet> -> busybox, and the usual dirs.
	var layer bytes.Buffer
	tw := tar.NewWriter(&layer)
	mtime := time.Unix(0, 0)
	for _, d := range []string{"bin/", "etc/", "proc/", "sys/", "dev/", "tmp/", "data/", "root/"} {
		mode := int64(0o755)
		if d == "tmp/" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: mode, ModTime: mtime}); err != nil {
			return err
		}
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "bin/busybox", Mode: 0o755, Size: int64(len(bb)), ModTime: mtime}); err != nil {
		return err
	}
	if _, err := tw.Write(bb); err != nil {
		return err
	}
	for _, applet := range strings.Fields(string(list)) {
		if applet == "busybox" || strings.Contains(applet, "/") {
			continue
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/" + applet, Linkname: "busybox", Mode: 0o777, ModTime: mtime}); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	diffID := sha256.Sum256(layer.Bytes())
	var gz bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
	zw.Write(layer.Bytes())
	zw.Close()

	config, _ := json.Marshal(map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"config": map[string]any{
			"Env":        []string{"PATH=/bin"},
			"Entrypoint": entrypoint,
			"Cmd":        cmd,
		},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{fmt.Sprintf("sha256:%x", diffID)}},
	})
	blob := func(b []byte) (string, int) { return fmt.Sprintf("%x", sha256.Sum256(b)), len(b) }
	cfgDigest, cfgSize := blob(config)
	layerDigest, layerSize := blob(gz.Bytes())
	manifest, _ := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        map[string]any{"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + cfgDigest, "size": cfgSize},
		"layers":        []any{map[string]any{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + layerDigest, "size": layerSize}},
	})
	mDigest, mSize := blob(manifest)
	tag := name[strings.LastIndex(name, ":")+1:]
	index, _ := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.index.v1+json",
		"manifests": []any{map[string]any{
			"mediaType": "application/vnd.oci.image.manifest.v1+json",
			"digest":    "sha256:" + mDigest, "size": mSize,
			"platform": map[string]string{"architecture": "amd64", "os": "linux"},
			"annotations": map[string]string{
				"io.containerd.image.name":          name,
				"org.opencontainers.image.ref.name": tag,
			},
		}},
	})

	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	ot := tar.NewWriter(f)
	add := func(name string, data []byte) error {
		if err := ot.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: mtime}); err != nil {
			return err
		}
		_, err := ot.Write(data)
		return err
	}
	for _, e := range []struct {
		n string
		d []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
		{"blobs/sha256/" + cfgDigest, config},
		{"blobs/sha256/" + layerDigest, gz.Bytes()},
		{"blobs/sha256/" + mDigest, manifest},
	} {
		if err := add(e.n, e.d); err != nil {
			return err
		}
	}
	if err := ot.Close(); err != nil {
		return err
	}
	return f.Close()
}
