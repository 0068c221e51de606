package nodeagent

import (
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/layercache/layercache/engine"
)

var (
	volumeSetupSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "layercache_volume_setup_seconds",
		Help:    "Time to publish a volume (create it and mount it) on this node.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
	})
	volumeStarts = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "layercache_volume_starts_total",
		Help: "Cache volumes published: warm (the cache had content), fallback (started from a restore-from cache) or cold.",
	}, []string{"start"})
	commitSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "layercache_commit_seconds",
		Help:    "Time to commit a volume's writes as the cache's next generation.",
		Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
	})
	commits = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "layercache_commits_total",
		Help: "Released cache volumes by result: committed, denied (not allowed to write), discarded (pod did not succeed, or nothing written), refused (a size bound broken), failed.",
	}, []string{"result"})
	volumeSizeExceeded = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "layercache_volume_size_exceeded_total",
		Help: "Cache volumes found holding more writes than their size (reported on their PV for the manager to delete the pod; their writes are never committed).",
	})
	registryTransfers = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "layercache_registry_transfers_total",
		Help: "Transfers with the registry by operation (push; pull, on a volume's setup; prefetch, in the background) and result (ok, failed).",
	}, []string{"op", "result"})
	registryBytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "layercache_registry_bytes_total",
		Help: "Bytes sent to (push) or received from (pull, prefetch) the registry.",
	}, []string{"op"})
	registrySeconds = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "layercache_registry_seconds_total",
		Help: "Time spent pushing to or pulling from the registry.",
	}, []string{"op"})
	cacheBytes = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "layercache_cache_bytes",
		Help: "Disk space a cache uses on this node.",
	}, []string{"namespace", "cache"})
)

func init() {
	metrics.Registry.MustRegister(volumeSetupSeconds, volumeStarts, commitSeconds, commits, volumeSizeExceeded, cacheBytes,
		registryTransfers, registryBytes, registrySeconds)
}

// cacheRef is the log value of a cache: {"name", "namespace"}, as
// klog.KObj gives for API objects.
func cacheRef(k engine.Key) klog.ObjectRef { return klog.KRef(k.Namespace, k.Name) }
