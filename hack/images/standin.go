package images

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/kubediskguard/kubediskguard/hack/runtimetest"
)

// standIn is a stand-in base image to make: its root filesystem and the
// configuration (Dockerfile instructions for docker import --change).
type standIn struct {
	ref     string // as FROM names it, with ":latest" when it names no tag
	changes []string
	write   func(*rootfs)
}

// standInLabel is the label that holds a stand-in's digest (see digest).
const standInLabel = "io.kubediskguard.stand-in.digest"

// caBundle is this machine's CA certificates (Debian's ca-certificates),
// where Debian-based images have them.
const caBundle = "/etc/ssl/certs/ca-certificates.crt"

// zoneinfo is this machine's tzdata.
const zoneinfo = "/usr/share/zoneinfo"

// newStandIn returns the stand-in for a base image that a FROM line names,
// or an error for a base it has none for.
func newStandIn(ref string, host goEnv) (standIn, error) {
	if strings.Contains(ref, "@") {
		return standIn{}, fmt.Errorf("base image %s is pinned by digest, which a stand-in cannot have", ref)
	}
	name, tag := ref, "latest"
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		name, tag = ref[:i], ref[i+1:]
	}
	switch name {
	case "golang", "library/golang", "docker.io/library/golang":
		version, _, _ := strings.Cut(tag, "-")
		if !goVersionIs(host.version, version) {
			return standIn{}, fmt.Errorf("base image %s wants Go %s, but this machine's Go (GOROOT %s) is %s", ref, version, host.root, host.version)
		}
		return golangStandIn(name+":"+tag, host)
	case "gcr.io/distroless/static-debian12":
		if tag != "latest" && tag != "nonroot" {
			return standIn{}, fmt.Errorf("no stand-in for base image %s: hack/images makes %s:latest and :nonroot", ref, name)
		}
		return distrolessStandIn(name+":"+tag, tag == "nonroot")
	}
	return standIn{}, fmt.Errorf("no stand-in for base image %s: hack/images makes golang:<this machine's Go version>[-variant] and gcr.io/distroless/static-debian12[:nonroot]; add one to hack/images/standin.go", ref)
}

// golangStandIn stands in for the official golang image: this machine's Go
// toolchain, a static busybox for /bin/sh and the usual commands, CA
// certificates, and the official image's environment.
func golangStandIn(ref string, host goEnv) (standIn, error) {
	if err := haveCABundle(); err != nil {
		return standIn{}, err
	}
	busybox, err := runtimetest.Busybox()
	if err != nil {
		return standIn{}, err
	}
	list, err := exec.Command(busybox, "--list-full").Output()
	if err != nil {
		return standIn{}, fmt.Errorf("%s --list-full: %w", busybox, err)
	}
	changes := []string{
		`ENV PATH="/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"`,
		fmt.Sprintf("ENV GOLANG_VERSION=%q", strings.TrimPrefix(host.version, "go")),
		`ENV GOPATH="/go"`,
		`ENV GOTOOLCHAIN="local"`,
	}
	for _, k := range sortedKeys(host.module) {
		changes = append(changes, fmt.Sprintf("ENV %s=%q", k, host.module[k]))
	}
	changes = append(changes, "WORKDIR /go")
	return standIn{ref: ref, changes: changes, write: func(r *rootfs) {
		r.copyFile("bin/busybox", busybox)
		for _, applet := range strings.Fields(string(list)) {
			if applet != "bin/busybox" {
				r.symlink(applet, "/bin/busybox")
			}
		}
		r.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
		r.file("etc/group", "root:x:0:\nnogroup:x:65534:\n")
		r.file("etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n")
		r.copyFile("etc/ssl/certs/ca-certificates.crt", caBundle)
		r.dir("root", 0o700, 0)
		r.dir("tmp", 0o1777, 0)
		r.dir("go", 0o1777, 0)
		r.dir("go/bin", 0o1777, 0)
		r.dir("go/src", 0o1777, 0)
		r.copyTree("usr/local/go", host.root)
	}}, nil
}

// distrolessStandIn stands in for gcr.io/distroless/static-debian12, its
// :nonroot variant when nonroot: users, CA certificates, tzdata, /tmp, no
// shell and no libc.
func distrolessStandIn(ref string, nonroot bool) (standIn, error) {
	if err := haveCABundle(); err != nil {
		return standIn{}, err
	}
	user, workdir := "0", "/"
	if nonroot {
		user, workdir = "65532", "/home/nonroot"
	}
	_, err := os.Stat(zoneinfo)
	tzdata := err == nil
	return standIn{ref: ref, changes: []string{
		`ENV PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"`,
		`ENV SSL_CERT_FILE="/etc/ssl/certs/ca-certificates.crt"`,
		"USER " + user,
		"WORKDIR " + workdir,
	}, write: func(r *rootfs) {
		r.file("etc/passwd", "root:x:0:0:root:/root:/sbin/nologin\n"+
			"nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"+
			"nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
		r.file("etc/group", "root:x:0:\nnobody:x:65534:\ntty:x:5:\nstaff:x:50:\nnonroot:x:65532:\n")
		r.file("etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n")
		r.copyFile("etc/ssl/certs/ca-certificates.crt", caBundle)
		r.dir("home/nonroot", 0o700, 65532)
		r.dir("root", 0o700, 0)
		r.dir("tmp", 0o1777, 0)
		if tzdata {
			r.copyTree("usr/share/zoneinfo", zoneinfo)
		}
	}}, nil
}

// haveCABundle checks that this machine has CA certificates for the
// stand-ins.
func haveCABundle() error {
	if _, err := os.Stat(caBundle); err != nil {
		return fmt.Errorf("CA certificates for the stand-in bases: %w (get them with: apt-get install ca-certificates)", err)
	}
	return nil
}

// tar writes the stand-in's root filesystem to w as a tar stream.
func (s standIn) tar(w io.Writer) error {
	r := &rootfs{tw: tar.NewWriter(w), dirs: map[string]bool{}}
	s.write(r)
	if r.err != nil {
		return r.err
	}
	return r.tw.Close()
}

// digest returns the sha256 of the stand-in's tar stream and configuration:
// the same digest, the same image.
func (s standIn) digest() (string, error) {
	h := sha256.New()
	if err := s.tar(h); err != nil {
		return "", fmt.Errorf("writing its root filesystem: %w", err)
	}
	for _, c := range s.changes {
		fmt.Fprintln(h, c)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// ensureStandIn imports the stand-in s with docker import, unless the
// image of that name has its digest.
func (dk docker) ensureStandIn(ctx context.Context, s standIn, log io.Writer) (StandIn, error) {
	start := time.Now()
	digest, err := s.digest()
	if err != nil {
		return StandIn{}, err
	}
	if have, err := dk.api.ImageInspect(ctx, s.ref); err == nil && have.Config != nil && have.Config.Labels[standInLabel] == digest {
		fmt.Fprintf(log, "images: stand-in %s is current (%.12s)\n", s.ref, strings.TrimPrefix(have.ID, "sha256:"))
		return StandIn{Ref: s.ref, ID: have.ID}, nil
	}

	fmt.Fprintf(log, "images: making stand-in %s\n", s.ref)
	args := []string{"import"}
	for _, c := range append(s.changes, "LABEL "+standInLabel+"="+digest) {
		args = append(args, "--change", c)
	}
	pr, pw := io.Pipe()
	written := make(chan error, 1)
	go func() {
		err := s.tar(pw)
		pw.CloseWithError(err)
		written <- err
	}()
	cmd := dk.cmd(ctx, append(args, "-", s.ref)...)
	cmd.Stdin = pr
	out, err := cmd.CombinedOutput()
	pr.Close() // a writer that docker stopped reading from returns
	if werr := <-written; werr != nil && !errors.Is(werr, io.ErrClosedPipe) {
		// Not its content: it must not pass for it.
		_, rmErr := dk.run(ctx, "image", "rm", "--force", s.ref)
		return StandIn{}, errors.Join(fmt.Errorf("writing its root filesystem: %w", werr), rmErr)
	}
	if err != nil {
		return StandIn{}, fmt.Errorf("docker import: %w: %s", err, strings.TrimSpace(string(out)))
	}
	id := strings.TrimSpace(string(out))
	fmt.Fprintf(log, "images: made stand-in %s (%.12s) in %s\n", s.ref, strings.TrimPrefix(id, "sha256:"), time.Since(start).Round(100*time.Millisecond))
	return StandIn{Ref: s.ref, ID: id, Made: true}, nil
}

// rootfs writes a root filesystem as a tar stream: each directory once and
// before what it holds, owned by root unless said, the same stream for the
// same files. The first error stops it and is kept in err.
type rootfs struct {
	tw   *tar.Writer
	dirs map[string]bool
	err  error
}

// epoch is the time of the entries that are not copies of files.
var epoch = time.Unix(0, 0)

func (r *rootfs) header(h *tar.Header) {
	if r.err != nil {
		return
	}
	r.parents(h.Name)
	if r.err == nil {
		r.err = r.tw.WriteHeader(h)
	}
}

// parents writes the missing directories above name, mode 0755.
func (r *rootfs) parents(name string) {
	if dir := path.Dir(strings.TrimSuffix(name, "/")); dir != "." && !r.dirs[dir] {
		r.dir(dir, 0o755, 0)
	}
}

// dir writes the directory name, owned by uid (its group too).
func (r *rootfs) dir(name string, mode int64, uid int) {
	if r.dirs[name] {
		return
	}
	r.parents(name)
	r.dirs[name] = true
	r.header(&tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode, Uid: uid, Gid: uid, ModTime: epoch})
}

// file writes the regular file name, mode 0644, with content.
func (r *rootfs) file(name, content string) {
	r.header(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(content)), ModTime: epoch})
	if r.err == nil {
		_, r.err = io.WriteString(r.tw, content)
	}
}

// symlink writes the symbolic link name to target.
func (r *rootfs) symlink(name, target string) {
	r.header(&tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: epoch})
}

// copyFile writes the file src of this machine as name, with its mode.
func (r *rootfs) copyFile(name, src string) {
	if r.err != nil {
		return
	}
	fi, err := os.Stat(src)
	if err != nil {
		r.err = err
		return
	}
	r.copyEntry(name, src, fi)
}

// copyTree writes the directory src of this machine, and all below it, as
// name: directories, regular files and symbolic links.
func (r *rootfs) copyTree(name, src string) {
	if r.err != nil {
		return
	}
	r.err = filepath.WalkDir(src, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		fi, err := e.Info()
		if err != nil {
			return err
		}
		r.copyEntry(path.Join(name, filepath.ToSlash(rel)), p, fi)
		return r.err
	})
}

// copyEntry writes the entry src of this machine, described by fi, as
// name; other than directories, regular files and symbolic links it
// leaves out.
func (r *rootfs) copyEntry(name, src string, fi fs.FileInfo) {
	h := &tar.Header{Name: name, Mode: int64(fi.Mode().Perm()), ModTime: fi.ModTime().Truncate(time.Second)}
	switch {
	case fi.IsDir():
		if r.dirs[name] {
			return
		}
		r.dirs[name] = true
		h.Typeflag, h.Name = tar.TypeDir, name+"/"
		r.header(h)
	case fi.Mode()&fs.ModeSymlink != 0:
		target, err := os.Readlink(src)
		if err != nil {
			r.err = err
			return
		}
		h.Typeflag, h.Linkname = tar.TypeSymlink, target
		r.header(h)
	case fi.Mode().IsRegular():
		h.Typeflag, h.Size = tar.TypeReg, fi.Size()
		r.header(h)
		if r.err != nil {
			return
		}
		f, err := os.Open(src)
		if err != nil {
			r.err = err
			return
		}
		defer f.Close()
		if _, err := io.Copy(r.tw, f); err != nil {
			r.err = fmt.Errorf("copying %s: %w", src, err)
		}
	}
}
