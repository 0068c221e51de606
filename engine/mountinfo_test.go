package engine

import (
	"slices"
	"strings"
	"testing"
)

func TestParseMountInfo(t *testing.T) {
	const info = `22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
45 22 0:39 / /tmp/ovl/mnt rw,relatime - overlay none rw,lowerdir+=/s/l2,lowerdir+=/s/l1,upperdir=/s/up,workdir=/s/wk,uuid=on
46 22 0:40 / /mnt/with\040space rw - overlay overlay rw,lowerdir=/s/a:/s/b\:c:/s/d,upperdir=/s/u\054x,workdir=/s/w
47 22 0:41 / /proc rw master:3 shared:4 - proc proc rw
`
	got, err := parseMountInfo(strings.NewReader(info))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 4 {
		t.Fatalf("got %d entries, want 4", len(got))
	}
	if got[0].MountPoint != "/" || got[0].FSType != "ext4" || got[0].Lowers != nil {
		t.Errorf("entry 0 = %+v", got[0])
	}
	if !slices.Equal(got[1].Lowers, []string{"/s/l2", "/s/l1"}) || got[1].Upper != "/s/up" {
		t.Errorf("lowerdir+ entry = %+v", got[1])
	}
	if got[2].MountPoint != "/mnt/with space" || !slices.Equal(got[2].Lowers, []string{"/s/a", "/s/b:c", "/s/d"}) || got[2].Upper != "/s/u,x" {
		t.Errorf("legacy entry = %+v", got[2])
	}
	if got[3].FSType != "proc" {
		t.Errorf("entry 3 = %+v", got[3])
	}
	if _, err := parseMountInfo(strings.NewReader("garbage line\n")); err == nil {
		t.Error("a malformed line was accepted")
	}
}
