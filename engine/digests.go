package engine

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// LayerDigest records how a layer is encoded as an OCI blob elsewhere (a
// registry): computing it means compressing the whole layer, and layers
// never change, so it is done once and kept beside the layer.
type LayerDigest struct {
	// Digest and Size are the compressed blob's; DiffID is the digest of
	// the uncompressed tar; MediaType says how it is compressed.
	Digest    string `json:"digest"`
	DiffID    string `json:"diffID"`
	Size      int64  `json:"size"`
	MediaType string `json:"mediaType"`
}

func (s *Store) digestsDir(k Key) string { return filepath.Join(s.cacheDir(k), dirDigests) }

// LayerDigest returns what SetLayerDigest recorded for layer id of cache k.
func (s *Store) LayerDigest(k Key, id string) (LayerDigest, bool, error) {
	if err := validateLayerID(id); err != nil {
		return LayerDigest{}, false, err
	}
	var d LayerDigest
	err := readJSON(filepath.Join(s.digestsDir(k), id+".json"), &d)
	if errors.Is(err, fs.ErrNotExist) {
		return LayerDigest{}, false, nil
	}
	return d, err == nil, err
}

// SetLayerDigest records the blob encoding of layer id of cache k, under
// the cache's lock: ErrNotFound if the layer is gone (the cache evicted or
// deleted meanwhile), so that a record never outlives, nor recreates, the
// cache it describes.
func (s *Store) SetLayerDigest(k Key, id string, d LayerDigest) error {
	if err := validateLayerID(id); err != nil {
		return err
	}
	lock, err := s.lockCache(k)
	if err != nil {
		return err
	}
	defer lock.unlock()
	if ok, err := s.layerExists(k, id); err != nil {
		return err
	} else if !ok {
		return fmt.Errorf("layer %s of %s: %w", id, k, ErrNotFound)
	}
	return s.writeLayerDigest(k, id, d)
}

// writeLayerDigest records d for layer id of k; the caller holds k's lock
// and the layer is there.
func (s *Store) writeLayerDigest(k Key, id string, d LayerDigest) error {
	if d.Digest == "" || d.DiffID == "" {
		return fmt.Errorf("layer %s: a digest and a diff ID are required", id)
	}
	if err := os.MkdirAll(s.digestsDir(k), 0o700); err != nil {
		return err
	}
	return writeJSONAtomic(s.digestsDir(k), id+".json", d)
}

// LayerWithDigest returns the ID of a layer of cache k recorded with blob
// digest, if the layer is still there.
func (s *Store) LayerWithDigest(k Key, digest string) (string, bool, error) {
	entries, err := os.ReadDir(s.digestsDir(k))
	if errors.Is(err, fs.ErrNotExist) {
		return "", false, nil
	}
	if err != nil {
		return "", false, err
	}
	for _, e := range entries {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || validateLayerID(id) != nil {
			continue
		}
		d, found, err := s.LayerDigest(k, id)
		if err != nil || !found || d.Digest != digest {
			continue
		}
		if ok, err := s.layerExists(k, id); err == nil && ok {
			return id, true, nil
		}
	}
	return "", false, nil
}

// removeStaleDigests drops the records of layers that are gone (called by
// GC under the cache's lock).
func (s *Store) removeStaleDigests(k Key) error {
	entries, err := os.ReadDir(s.digestsDir(k))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if ok && validateLayerID(id) == nil {
			if there, err := s.layerExists(k, id); err != nil || there {
				continue
			}
		} else if !isTmpName(e.Name()) {
			continue
		}
		if err := os.Remove(filepath.Join(s.digestsDir(k), e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}
