package controllers

import (
	"errors"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/manager"
)

// CacheOptions restricts the manager's pod cache to build pods (it never
// holds the cluster's other pods) and keeps no object's managedFields,
// which no reconciler reads.
func CacheOptions() cache.Options {
	return cache.Options{DefaultTransform: cache.TransformStripManagedFields(), ByObject: map[client.Object]cache.ByObject{
		&corev1.Pod{}: {Label: LabelledPods()},
	}}
}

// Setup registers the manager's reconcilers.
func Setup(mgr manager.Manager, opts Options) error {
	opts.defaults()
	return errors.Join(
		(&PodReconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorderFor("layercache-claims"), Options: opts}).SetupWithManager(mgr),
		(&Provisioner{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorderFor("layercache-provisioner"), MaxVolumeSize: opts.MaxVolumeSize}).SetupWithManager(mgr),
		(&CacheReconciler{Client: mgr.GetClient(), Registry: opts.Registry, Recorder: mgr.GetEventRecorderFor("layercache-caches")}).SetupWithManager(mgr),
		(&SkippedReconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), Recorder: mgr.GetEventRecorderFor("layercache-webhook"), Exempt: []string{"kube-system", opts.Namespace}}).SetupWithManager(mgr),
		(&NodeReconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorderFor("layercache-nodes")}).SetupWithManager(mgr),
		(&OverLimitReconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorderFor("layercache-sizes")}).SetupWithManager(mgr),
	)
}
