package controllers

import (
	"cmp"
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	"github.com/layercache/layercache/api/v1alpha1"
)

// +kubebuilder:rbac:groups=layercache.io,resources=caches,verbs=create

// mayCommit tells whether a pod that ended in phase lets its writable
// volumes commit.
func mayCommit(phase string, commitOnFailure bool) bool {
	return phase == string(corev1.PodSucceeded) || (phase == string(corev1.PodFailed) && commitOnFailure)
}

// grantCommit records, before the outcome that lets the node agent commit
// goes on the PV, that the manager let the pod's node commit this cache:
// the Cache is created at its first commit anywhere, and the node's
// NodeCache (created if absent) gets spec.commitGranted. The manager
// adopts a node's registry image only from a NodeCache so marked. A
// volume that may not commit grants nothing.
func (r *PodReconciler) grantCommit(ctx context.Context, pod *corev1.Pod, pv *corev1.PersistentVolume, commit bool) error {
	if !commit || pv.Spec.CSI == nil {
		return nil
	}
	vc, err := v1alpha1.ParseVolumeContext(pv.Spec.CSI.VolumeAttributes)
	node := cmp.Or(vc.Node, pod.Spec.NodeName) // a PV made before the node attribute: the pod's node
	if err != nil || vc.Kind != v1alpha1.KindCache || !vc.Write || node == "" || (pod.Spec.NodeName != "" && pod.Spec.NodeName != node) {
		return nil
	}
	cache, err := getOrCreate(ctx, r.Client, &v1alpha1.Cache{ObjectMeta: metav1.ObjectMeta{Namespace: vc.Namespace, Name: vc.Cache}})
	if err != nil {
		return fmt.Errorf("creating Cache %s: %w", vc.Cache, err)
	}
	if cache.DeletionTimestamp != nil {
		return nil // being deleted: its data goes, whatever is committed
	}
	nc, err := newNodeCache(cache, node, r.Scheme())
	if err != nil {
		return err
	}
	if nc, err = getOrCreate(ctx, r.Client, nc); err != nil {
		return fmt.Errorf("creating NodeCache %s: %w", nc.Name, err)
	}
	if nc.Spec.CommitGranted != nil || nc.DeletionTimestamp != nil {
		return nil
	}
	before := nc.DeepCopy()
	now := metav1.Now()
	nc.Spec.CommitGranted = &now
	return r.Patch(ctx, nc, client.MergeFrom(before))
}

// getOrCreate reads want's object (from the cache: no API call when it
// exists, the common case after a cache's first commit on a node), or
// creates it as given.
func getOrCreate[T client.Object](ctx context.Context, c client.Client, want T) (T, error) {
	got := want.DeepCopyObject().(T)
	err := c.Get(ctx, client.ObjectKeyFromObject(want), got)
	if !apierrors.IsNotFound(err) {
		return got, err
	}
	err = c.Create(ctx, want)
	if apierrors.IsAlreadyExists(err) {
		// Created meanwhile, and not in the cache yet: the retry reads it.
		return want, fmt.Errorf("%s was created meanwhile: %w", client.ObjectKeyFromObject(want), err)
	}
	return want, err
}

// newNodeCache is the NodeCache of cache c on node, owned by c, holding
// the node's finalizer, with the Cache's ttl and registry image.
func newNodeCache(c *v1alpha1.Cache, node string, scheme *runtime.Scheme) (*v1alpha1.NodeCache, error) {
	var image *v1alpha1.RegistryImage
	if c.SyncsThroughRegistry() {
		image = c.Status.Registry.DeepCopy()
	}
	nc := &v1alpha1.NodeCache{
		ObjectMeta: metav1.ObjectMeta{Namespace: c.Namespace, Name: v1alpha1.NodeCacheName(c.Name, node),
			Labels:     map[string]string{v1alpha1.LabelCache: c.Name, v1alpha1.LabelNode: v1alpha1.NodeLabelValue(node)},
			Finalizers: []string{v1alpha1.FinalizerNodeData}},
		Spec: v1alpha1.NodeCacheSpec{Cache: c.Name, Node: node, TTL: c.Spec.TTL.DeepCopy(), Registry: image},
	}
	return nc, controllerutil.SetControllerReference(c, nc, scheme)
}
