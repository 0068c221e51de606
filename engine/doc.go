// Package engine is layercache's node-local layered store.
//
// A Store lives in one directory (by default /var/lib/layercache) and holds
// caches, immutable layers, generations and volumes:
//
//	ROOT/
//	  caches/NAMESPACE/NAME/
//	    HEAD                     current generation, replaced by one rename
//	    generations/NNNNNNNNNNNN.json   ordered layer list (bottom first)
//	    layers/ID/               immutable directory trees (commits, compactions),
//	                             or an image layer's mount point
//	    layers/ID.erofs          an image layer (a pull): one EROFS image, mounted on layers/ID
//	    digests/ID.json          a layer's OCI blob digests, computed once
//	    LAST_USED                its mtime: when a volume last started from it
//	    PUSHED                   what was last pushed (by generation identity)
//	  volumes/ID/
//	    volume.json              cache, base generation and its layers
//	    upper/ work/             the volume's private overlay dirs
//	  locks/                     per-cache flock files; tmp.lock for tmp/
//	  tmp/                       work in progress, each entry flocked by its writer
//	  OWNER                      who the data belong to (the Node's UID)
//	  empty/                     the lower layer of a cache with no content yet
//
// A volume is an overlay mount whose lower layers are the layers of the
// generation that was the cache's head when the volume was created, and
// whose upper layer is private to the volume. Committing a volume renames its
// upper dir into the cache's layers and moves HEAD to a new generation (the
// volume's base layers plus the new one): last writer wins, and readers that
// started earlier keep their snapshot. Compaction merges a long chain into a
// single layer off the commit path (image layers at its bottom stay as they
// are); GC removes what no generation, volume or live mount references.
//
// An imported layer is, where the kernel mounts EROFS from a file, one image
// file written in one pass from the layer's tar (erofs.go, imagelayer.go),
// mounted read-only before anything reads it (imagemount.go).
//
// Several processes may share one store: every change to a cache happens
// under that cache's flock, and each operation checks its own precondition
// under it (a delete or an eviction refuses any user, fallback users
// included; an import refuses content no newer than the head), so callers
// never decide from an earlier read. Nothing here imports Kubernetes.
package engine
