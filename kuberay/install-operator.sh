#!/usr/bin/env bash
# Install (or upgrade) the KubeRay operator from its helm chart, pinned to 1.7.0.
#   bash kuberay/install-operator.sh
# Environment knobs:
#   NAMESPACE=kuberay-system   namespace of the operator (created if missing)
#   KUBERAY_CHART_VERSION=1.7.0  chart version; the CRDs in the chart are the ones
#                                tests/kuberay validates the manifests against
# Needs helm 3 and kubectl pointed at the target cluster. The chart installs the
# RayCluster / RayJob / RayService CRDs from its crds/ directory on first install;
# helm never upgrades CRDs, so after a chart upgrade apply the new CRDs yourself
# (`kubectl apply --server-side -k "github.com/ray-project/kuberay/ray-operator/config/crd?ref=v<version>"`).
set -euo pipefail
cd "$(dirname "$0")/.."

NAMESPACE=${NAMESPACE:-kuberay-system}
KUBERAY_CHART_VERSION=${KUBERAY_CHART_VERSION:-1.7.0}
VALUES=kuberay/helm/values.kuberay-operator.yaml

log() { printf '[install-operator] %s\n' "$*"; }

helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update
helm repo update kuberay
log "installing kuberay-operator chart $KUBERAY_CHART_VERSION into namespace $NAMESPACE"
# `upgrade --install`: the first run is `helm install kuberay-operator
# kuberay/kuberay-operator --version 1.7.0`; later runs apply changed values.
helm upgrade --install kuberay-operator kuberay/kuberay-operator \
  --version "$KUBERAY_CHART_VERSION" \
  --namespace "$NAMESPACE" --create-namespace \
  --values "$VALUES" \
  --wait --timeout 5m
kubectl get crd rayclusters.ray.io rayjobs.ray.io >/dev/null
log "operator ready: $(kubectl -n "$NAMESPACE" get deploy kuberay-operator \
  -o jsonpath='{.status.readyReplicas}')/1 replicas; CRDs present"
