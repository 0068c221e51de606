// Package chart holds the checks of the Helm chart in dist/chart: it lints,
// and it renders the same objects as config/default (its default values) and
// config/local (the local cluster's values), so that the chart and the
// kustomize configuration never drift apart. The tests run the real helm
// (bin/helm, built by hack/helm/build.sh) and kubectl.
package chart
