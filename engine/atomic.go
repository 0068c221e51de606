package engine

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// tmpFilePrefix marks files being written; GC removes leftovers (a writer
// always holds the cache lock, so GC, holding it too, sees only dead ones).
const tmpFilePrefix = ".tmp-"

func randomID() string {
	var b [12]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("crypto/rand failed: %v", err))
	}
	return hex.EncodeToString(b[:])
}

// writeFileAtomic replaces dir/name with data so that a crash at any
// instant leaves either the old file or the new one, and the new one is
// durable when it returns.
func writeFileAtomic(dirPath, name string, data []byte) error {
	tmp := filepath.Join(dirPath, tmpFilePrefix+name+"-"+randomID())
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("writing %s: %w", name, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", name, err)
	}
	failpoint("write/" + name + "/synced")
	if err := os.Rename(tmp, filepath.Join(dirPath, name)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", name, err)
	}
	failpoint("write/" + name + "/renamed")
	return syncDir(dirPath)
}

func writeJSONAtomic(dirPath, name string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding %s: %w", name, err)
	}
	return writeFileAtomic(dirPath, name, append(data, '\n'))
}

func readJSON(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("decoding %s: %w", path, err)
	}
	return nil
}

// syncDirHook, when set (only by this package's tests), sees every
// directory that is fsynced.
var syncDirHook func(path string)

func syncDir(path string) error {
	if syncDirHook != nil {
		syncDirHook(path)
	}
	d, err := os.Open(path)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", path, err)
	}
	return nil
}

func isTmpName(name string) bool { return strings.HasPrefix(name, tmpFilePrefix) }
