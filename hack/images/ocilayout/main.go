// Command ocilayout writes a single-layer container image as an OCI image
// layout tarball, without a daemon or a registry, reproducibly: entries
// sorted, times zero, owner root, gzip without a name or time. The same
// root file system gives the same digest. containerd imports the result
// with `ctr images import` under the name given by --ref.
//
//	ocilayout --ref localhost/layercache/cli:dev --out cli.tar \
//	    --entrypoint /layercache ROOTFS
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"
)

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *platform         `json:"platform,omitempty"`
}

type platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

type imageConfig struct {
	Env        []string `json:"Env,omitempty"`
	Entrypoint []string `json:"Entrypoint,omitempty"`
	Cmd        []string `json:"Cmd,omitempty"`
	WorkingDir string   `json:"WorkingDir,omitempty"`
	User       string   `json:"User,omitempty"`
}

type options struct {
	ref, out, user  string
	entrypoint, cmd []string
	env             []string
	rootfs          string
}

func main() {
	var o options
	var entrypoint, cmd, env string
	flag.StringVar(&o.ref, "ref", "", "image name, e.g. localhost/layercache/cli:dev")
	flag.StringVar(&o.out, "out", "", "output tarball")
	flag.StringVar(&entrypoint, "entrypoint", "", "comma-separated entrypoint")
	flag.StringVar(&cmd, "cmd", "", "comma-separated command")
	flag.StringVar(&env, "env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "comma-separated environment")
	flag.StringVar(&o.user, "user", "", "user to run as (e.g. 65532:65532)")
	flag.Parse()
	o.entrypoint, o.cmd, o.env = splitList(entrypoint), splitList(cmd), splitList(env)
	if flag.NArg() != 1 || o.ref == "" || o.out == "" {
		fmt.Fprintln(os.Stderr, "usage: ocilayout --ref NAME --out FILE [--entrypoint A,B] [--cmd A,B] ROOTFS")
		os.Exit(2)
	}
	o.rootfs = flag.Arg(0)
	digest, err := write(o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ocilayout: %s\n", err)
		os.Exit(1)
	}
	fmt.Printf("%s %s\n", o.ref, digest)
}

func splitList(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}

// blobs collects content-addressed blobs by digest.
type blobs map[string][]byte

func (b blobs) add(mediaType string, data []byte) descriptor {
	sum := sha256.Sum256(data)
	d := "sha256:" + hex.EncodeToString(sum[:])
	b[d] = data
	return descriptor{MediaType: mediaType, Digest: d, Size: int64(len(data))}
}

// write builds the layout and returns the manifest digest.
func write(o options) (string, error) {
	layer, err := tarDir(o.rootfs)
	if err != nil {
		return "", err
	}
	diffID := sha256.Sum256(layer)
	var gz bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&gz, gzip.BestCompression)
	zw.ModTime = time.Unix(0, 0)
	if _, err := zw.Write(layer); err != nil {
		return "", err
	}
	if err := zw.Close(); err != nil {
		return "", err
	}
	b := blobs{}
	layerDesc := b.add("application/vnd.oci.image.layer.v1.tar+gzip", gz.Bytes())
	config, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH, "os": "linux",
		"config": imageConfig{Env: o.env, Entrypoint: o.entrypoint, Cmd: o.cmd, WorkingDir: "/", User: o.user},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + hex.EncodeToString(diffID[:])}},
	})
	if err != nil {
		return "", err
	}
	configDesc := b.add("application/vnd.oci.image.config.v1+json", config)
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
		"config": configDesc, "layers": []descriptor{layerDesc},
	})
	if err != nil {
		return "", err
	}
	manifestDesc := b.add("application/vnd.oci.image.manifest.v1+json", manifest)
	tag := o.ref[strings.LastIndex(o.ref, ":")+1:]
	manifestDesc.Annotations = map[string]string{
		"io.containerd.image.name":          o.ref,
		"org.opencontainers.image.ref.name": tag,
	}
	manifestDesc.Platform = &platform{Architecture: runtime.GOARCH, OS: "linux"}
	index, err := json.Marshal(map[string]any{"schemaVersion": 2, "manifests": []descriptor{manifestDesc}})
	if err != nil {
		return "", err
	}

	var out bytes.Buffer
	tw := tar.NewWriter(&out)
	files := map[string][]byte{"oci-layout": []byte(`{"imageLayoutVersion":"1.0.0"}`), "index.json": index}
	for d, data := range b {
		files["blobs/sha256/"+strings.TrimPrefix(d, "sha256:")] = data
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, dir := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(header(dir, tar.TypeDir, 0o755, 0)); err != nil {
			return "", err
		}
	}
	for _, n := range names {
		if err := tw.WriteHeader(header(n, tar.TypeReg, 0o644, int64(len(files[n])))); err != nil {
			return "", err
		}
		if _, err := tw.Write(files[n]); err != nil {
			return "", err
		}
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	tmp := o.out + ".tmp"
	if err := os.WriteFile(tmp, out.Bytes(), 0o644); err != nil {
		return "", err
	}
	return manifestDesc.Digest, os.Rename(tmp, o.out)
}

func header(name string, typ byte, mode int64, size int64) *tar.Header {
	return &tar.Header{Name: name, Typeflag: typ, Mode: mode, Size: size, ModTime: time.Unix(0, 0), Format: tar.FormatPAX}
}

// tarDir archives root reproducibly: sorted, times zero, owned by root.
func tarDir(root string) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil || rel == "." {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		var h *tar.Header
		mode := unixMode(info.Mode())
		switch {
		case d.IsDir():
			h = header(rel+"/", tar.TypeDir, mode, 0)
		case info.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			h = header(rel, tar.TypeSymlink, 0o777, 0)
			h.Linkname = target
		case info.Mode().IsRegular():
			h = header(rel, tar.TypeReg, mode, info.Size())
		default:
			return fmt.Errorf("%s: unsupported file type %s", p, info.Mode().Type())
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if h.Typeflag == tar.TypeReg {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, f)
			f.Close()
			return err
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// unixMode converts permission and special bits to their Unix values.
func unixMode(m fs.FileMode) int64 {
	mode := int64(m.Perm())
	for _, b := range []struct {
		fs   fs.FileMode
		unix int64
	}{{fs.ModeSetuid, 0o4000}, {fs.ModeSetgid, 0o2000}, {fs.ModeSticky, 0o1000}} {
		if m&b.fs != 0 {
			mode |= b.unix
		}
	}
	return mode
}
