package device

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// mountinfo is a node's mount table: a root on a virtio disk, a data disk on
// an NVMe partition, LVM, filesystems without block devices, and a stacked
// mount.
const mountinfo = `22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
30 27 259:1 / /data rw,relatime shared:5 - xfs /dev/nvme0n1p1 rw,attr2
35 30 259:2 / /data/logs rw - ext4 /dev/nvme0n1p2 rw
31 27 253:0 / /var/lib/lvm\040data rw - ext4 /dev/mapper/vg-data rw
32 27 0:40 / /tmp rw - tmpfs tmpfs rw
33 27 0:41 / /merged rw - overlay overlay rw,lowerdir=/a,upperdir=/b,workdir=/c
34 27 0:42 /@data /btrfs rw - btrfs /dev/vdc rw,subvol=/@data
36 27 259:1 / /stacked rw - xfs /dev/nvme0n1p1 rw
37 36 253:0 / /stacked rw - ext4 /dev/mapper/vg-data rw
38 27 259:5 / /gone rw - ext4 /dev/nvme9n1 rw
39 27 254:0 /var/tmp/data /bound rw - ext4 /dev/vda rw
40 27 0:43 / /later rw - tmpfs tmpfs rw
41 40 259:2 / /later rw - ext4 /dev/nvme0n1p2 rw
`

// fakeNode builds a fake /proc, /sys and /dev as on a real node, and a
// resolver over them. Paths that exist on the fake node (as seen through
// /proc/self/root) are the keys of files, with the device they are on.
func fakeNode(t *testing.T) *Resolver {
	t.Helper()
	root := t.TempDir()
	write := func(rel, content string) {
		t.Helper()
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	link := func(dev, target string) {
		t.Helper()
		p := filepath.Join(root, "sys/dev/block", dev)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, p); err != nil {
			t.Fatal(err)
		}
	}
	write("proc/self/mountinfo", mountinfo)

	// sysfs as the kernel lays it out: /sys/dev/block/MAJ:MIN links into
	// /sys/devices, a partition is a subdirectory of its disk with a
	// "partition" file.
	nvme := "sys/devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1"
	write(nvme+"/dev", "259:0\n")
	write(nvme+"/nvme0n1p1/dev", "259:1\n")
	write(nvme+"/nvme0n1p1/partition", "1\n")
	write(nvme+"/nvme0n1p2/dev", "259:2\n")
	write(nvme+"/nvme0n1p2/partition", "2\n")
	link("259:0", "../../devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1")
	link("259:1", "../../devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1/nvme0n1p1")
	link("259:2", "../../devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1/nvme0n1p2")
	vda := "sys/devices/pci0000:00/0000:00:02.0/virtio1/block/vda"
	write(vda+"/dev", "254:0\n")
	link("254:0", "../../devices/pci0000:00/0000:00:02.0/virtio1/block/vda")
	write("sys/devices/virtual/block/dm-0/dev", "253:0\n")
	write("sys/devices/virtual/block/dm-0/dm/name", "vg-data\n")
	link("253:0", "../../devices/virtual/block/dm-0")

	existing := map[string]Device{
		"/":                 {254, 0},
		"/datab":            {254, 0},
		"/data":             {259, 1},
		"/data/app":         {259, 1},
		"/data/logs":        {259, 2},
		"/var/lib/lvm data": {253, 0},
		"/tmp":              {0, 40},
		"/merged":           {0, 41},
		"/btrfs":            {0, 42},
		"/stacked":          {253, 0},
		"/gone":             {259, 5},
		"/symlink-to-data":  {259, 1}, // a symbolic link to /data
		"/bound":            {254, 0}, // a bind mount of a directory of the root filesystem
		"/later":            {259, 2}, // a disk mounted over a tmpfs
	}
	nodes := map[string]Device{
		"nvme0n1":        {259, 0},
		"nvme0n1p1":      {259, 1},
		"mapper/vg-data": {253, 0},
		"vda":            {254, 0},
		"nvme9n1":        {259, 9},
	}
	procRoot := filepath.Join(root, "proc")
	devRoot := filepath.Join(root, "dev")
	return &Resolver{
		ProcRoot: procRoot,
		SysRoot:  filepath.Join(root, "sys"),
		DevRoot:  devRoot,
		stat: func(path string, st *syscall.Stat_t) error {
			*st = syscall.Stat_t{}
			if rel, ok := cutProcRoot(path, procRoot); ok {
				if rel == "" {
					rel = "/"
				}
				d, ok := existing[rel]
				if !ok {
					return syscall.ENOENT
				}
				st.Mode = syscall.S_IFDIR | 0o755
				st.Dev = mkdev(d.Major, d.Minor)
				return nil
			}
			if rel, ok := strings.CutPrefix(path, devRoot+"/"); ok {
				if rel == "null" {
					st.Mode = syscall.S_IFCHR | 0o666
					st.Rdev = mkdev(1, 3)
					return nil
				}
				d, ok := nodes[rel]
				if !ok {
					return syscall.ENOENT
				}
				st.Mode = syscall.S_IFBLK | 0o660
				st.Rdev = mkdev(d.Major, d.Minor)
				return nil
			}
			t.Errorf("unexpected stat of %s", path)
			return syscall.ENOENT
		},
	}
}

func TestForMount(t *testing.T) {
	tests := map[string]struct {
		path      string
		want      Device
		wantMount string
		wantErr   []string
	}{
		"a partition's mount point resolves to the whole disk": {
			path: "/data", want: Device{259, 0}, wantMount: "/data",
		},
		"a directory below a mount point resolves through its mount": {
			path: "/data/app", want: Device{259, 0}, wantMount: "/data",
		},
		"an unclean path is cleaned first": {
			path: "/data//app/../app/", want: Device{259, 0}, wantMount: "/data",
		},
		"the nearest mount wins over its parent mount": {
			path: "/data/logs", want: Device{259, 0}, wantMount: "/data/logs",
		},
		"a sibling that merely shares a prefix does not match": {
			path: "/datab", want: Device{254, 0}, wantMount: "/",
		},
		"a filesystem directly on a whole disk is that disk": {
			path: "/", want: Device{254, 0}, wantMount: "/",
		},
		"an LVM volume with an escaped space in its mount point is limited as itself": {
			path: "/var/lib/lvm data", want: Device{253, 0}, wantMount: "/var/lib/lvm data",
		},
		"the last of stacked mounts wins": {
			path: "/stacked", want: Device{253, 0}, wantMount: "/stacked",
		},
		"tmpfs is an error naming the mount and the filesystem type": {
			path: "/tmp", wantErr: []string{"tmpfs", "mounted at /tmp", "no block device"},
		},
		"overlay is an error naming the mount and the filesystem type": {
			path: "/merged", wantErr: []string{"overlay", "mounted at /merged", "no block device"},
		},
		"a btrfs subvolume is an error naming the mount and its source": {
			path: "/btrfs", wantErr: []string{"btrfs", "mounted at /btrfs", "/dev/vdc"},
		},
		"a path that does not exist is an error": {
			path: "/nonexistent", wantErr: []string{"mount path /nonexistent", "no such file"},
		},
		"a relative path is an error": {
			path: "data", wantErr: []string{`"data" is not absolute`},
		},
		"a device missing from sysfs is an error naming it": {
			path: "/gone", wantErr: []string{"259:5 does not exist", "/dev/nvme9n1"},
		},
		"a symbolic link into another mount is an error, not the wrong disk": {
			path: "/symlink-to-data", wantErr: []string{"symbolic link", "259:1", "254:0"},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			r := fakeNode(t)
			got, err := r.ForMount(tc.path)
			if len(tc.wantErr) > 0 {
				if err == nil {
					t.Fatalf("ForMount(%q) = %v, want an error", tc.path, got)
				}
				for _, w := range tc.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("ForMount(%q) error %q does not contain %q", tc.path, err, w)
					}
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ForMount(%q) = %v, %v; want %v", tc.path, got, err, tc.want)
			}
			m, err := r.Mount(tc.path)
			if err != nil || m.MountPoint != tc.wantMount {
				t.Errorf("Mount(%q) = %+v, %v; want mount point %q", tc.path, m, err, tc.wantMount)
			}
		})
	}
}

func TestForList(t *testing.T) {
	tests := map[string]struct {
		list    string
		want    []Device
		wantErr []string
	}{
		"a device path resolves through its node": {
			list: "/dev/nvme0n1", want: []Device{{259, 0}},
		},
		"a device number is taken as it is": {
			list: "254:0", want: []Device{{254, 0}},
		},
		"paths and numbers mix, in the order given": {
			list: "/dev/vda, 259:0 ,/dev/mapper/vg-data", want: []Device{{254, 0}, {259, 0}, {253, 0}},
		},
		"duplicates are removed, also when a partition stands for its disk": {
			list: "259:0,/dev/nvme0n1,259:1,/dev/nvme0n1p1,259:2", want: []Device{{259, 0}},
		},
		"empty items are ignored": {
			list: "254:0,,", want: []Device{{254, 0}},
		},
		"a device number that does not exist is an error": {
			list: "254:0,259:7", wantErr: []string{`device "259:7"`, "does not exist"},
		},
		"a device node that does not exist is an error": {
			list: "/dev/sdz", wantErr: []string{`device "/dev/sdz"`, "no such file"},
		},
		"a node whose device is not in sysfs is an error": {
			list: "/dev/nvme9n1", wantErr: []string{`device "/dev/nvme9n1"`, "259:9 does not exist"},
		},
		"a character device is an error": {
			list: "/dev/null", wantErr: []string{"/dev/null is not a block device"},
		},
		"a path outside /dev is an error": {
			list: "/data", wantErr: []string{`device "/data"`, "under /dev"},
		},
		"garbage is an error": {
			list: "nvme0n1", wantErr: []string{`device "nvme0n1"`, "MAJOR:MINOR"},
		},
		"a list of nothing is an error": {
			list: " , ", wantErr: []string{"names no device"},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := fakeNode(t).ForList(tc.list)
			if len(tc.wantErr) > 0 {
				if err == nil {
					t.Fatalf("ForList(%q) = %v, want an error", tc.list, got)
				}
				for _, w := range tc.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("ForList(%q) error %q does not contain %q", tc.list, err, w)
					}
				}
				return
			}
			if err != nil || !equal(got, tc.want) {
				t.Fatalf("ForList(%q) = %v, %v; want %v", tc.list, got, err, tc.want)
			}
		})
	}
}

func TestDataDevices(t *testing.T) {
	tests := map[string]struct {
		mount, devices string
		want           []Device
	}{
		"the data mount's disk is limited when no devices are listed": {
			mount: "/data", want: []Device{{259, 0}},
		},
		"listed devices override the data mount": {
			mount: "/tmp", devices: "/dev/vda,253:0", want: []Device{{254, 0}, {253, 0}},
		},
		"a blank device list falls back to the data mount": {
			mount: "/data", devices: " ", want: []Device{{259, 0}},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := fakeNode(t).DataDevices(tc.mount, tc.devices)
			if err != nil || !equal(got, tc.want) {
				t.Fatalf("DataDevices(%q, %q) = %v, %v; want %v", tc.mount, tc.devices, got, err, tc.want)
			}
		})
	}
}

func TestMissingMountinfoIsAnError(t *testing.T) {
	r := fakeNode(t)
	r.PID = "1" // the fake /proc has a mountinfo only for self
	_, err := r.ForMount("/data")
	if err == nil {
		t.Fatal("want an error")
	}
	if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "finding the mount of /data") ||
		!strings.Contains(err.Error(), filepath.Join(r.ProcRoot, "1", "mountinfo")) {
		t.Errorf("error %q: want a not-exist error naming the path and the mountinfo file", err)
	}
}

// cutProcRoot returns the path below /proc/<pid>/root, as a process in that
// PID's mount namespace would see it.
func cutProcRoot(path, procRoot string) (string, bool) {
	rest, ok := strings.CutPrefix(path, procRoot+"/")
	if !ok {
		return "", false
	}
	_, rest, ok = strings.Cut(rest, "/")
	if !ok {
		return "", false
	}
	return strings.CutPrefix(rest, "root")
}

func equal(a, b []Device) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
