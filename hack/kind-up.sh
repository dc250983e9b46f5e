#!/usr/bin/env bash
# gpuyard on kind, for laptops with Docker: the build machines have no Docker engine and use
# the local cluster (make cluster-up) instead. Both paths share their definitions: the GPU
# pools, node labels, taints and GPU products come from hack/localcluster/topology.py, the
# DCGM exporter simulator and the Prometheus configuration from hack/localcluster/, and the
# operator is installed from charts/gpuyard.
#
#   hack/kind-up.sh        create the cluster, fake GPUs, simulator, Prometheus; helm install
#   hack/kind-up.sh down   stop the simulator and Prometheus, delete the cluster
#
# Needs docker, kind, kubectl, helm, prometheus and `make venv`. GPUYARD_TOPOLOGY sets the
# pools (default a100=1x8:a100-80gb,l4=1x4:l4: one kind worker per GPU node, plus one
# worker without GPUs for the operator).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
name="${KIND_CLUSTER_NAME:-gpuyard}"
topology="${GPUYARD_TOPOLOGY:-a100=1x8:a100-80gb,l4=1x4:l4}"
state="${XDG_CACHE_HOME:-$HOME/.cache}/gpuyard/kind-$name"
python="$root/.venv/bin/python"
export PYTHONPATH="$root/hack"

stop_pid() {
  if [[ -f "$state/$1.pid" ]]; then
    kill "$(cat "$state/$1.pid")" 2>/dev/null || true
    rm -f "$state/$1.pid"
  fi
}

if [[ "${1:-up}" == "down" ]]; then
  stop_pid dcgm-sim
  stop_pid prometheus
  kind delete cluster --name "$name"
  rm -rf "$state"
  exit 0
fi

mkdir -p "$state"
kubeconfig="$state/kubeconfig"
# One line per GPU node, from the shared topology: "NAME GPUS TAINT LABEL=VALUE...".
"$python" - "$topology" > "$state/gpu-nodes.txt" <<'PY'
import sys
from localcluster.topology import GPU_RESOURCE, node_manifests, parse_topology
for node in node_manifests(parse_topology(sys.argv[1])):
    gpus = node["status"]["capacity"].get(GPU_RESOURCE)
    if gpus:
        taints = [f"{t['key']}={t['value']}:{t['effect']}" for t in node["spec"]["taints"]]
        labels = [f"{k}={v}" for k, v in node["metadata"]["labels"].items()
                  if k.startswith(("gpuyard.io/", "nvidia.com/"))]
        print(node["metadata"]["name"], gpus, ",".join(taints), *labels)
PY
gpu_nodes="$(wc -l < "$state/gpu-nodes.txt")"

{
  printf 'kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes:\n- role: control-plane\n- role: worker\n'
  for _ in $(seq "$gpu_nodes"); do printf -- '- role: worker\n'; done
} > "$state/kind.yaml"
kind create cluster --name "$name" --config "$state/kind.yaml" --kubeconfig "$kubeconfig" --wait 120s
export KUBECONFIG="$kubeconfig"

# The first worker stays GPU-less (the operator runs there); the others become GPU nodes.
read -ra workers <<<"$(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' \
  -o jsonpath='{.items[*].metadata.name}')"
index=1
while read -r pool_node gpus taints labels; do
  node="${workers[$index]}"
  index=$((index + 1))
  echo "kind-up: $node plays $pool_node ($gpus GPUs)"
  read -ra label_args <<<"$labels"
  # The DCGM simulator serves the GPUs of nodes labelled type=kwok (its fake GPU nodes).
  kubectl label node "$node" --overwrite "${label_args[@]}" type=kwok
  read -ra taint_args <<<"${taints//,/ }"
  kubectl taint node "$node" --overwrite "${taint_args[@]}"
  # No device plugin runs here: advertise the GPUs as a node-level extended resource in the
  # node's status (a JSON patch on /status; the kubelet leaves resources it does not manage).
  patch='[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"%s"},'
  patch+='{"op":"add","path":"/status/allocatable/nvidia.com~1gpu","value":"%s"}]'
  # shellcheck disable=SC2059  # the format is ours, the GPU count its only argument
  kubectl patch node "$node" --subresource=status --type=json -p "$(printf "$patch" "$gpus" "$gpus")"
done < "$state/gpu-nodes.txt"

# The DCGM simulator and Prometheus run on the host, as in the local cluster. Pods reach
# the host through the kind network's gateway (Linux) or host.docker.internal (Docker
# Desktop), so Prometheus listens there.
if [[ "$(uname -s)" == "Linux" ]]; then
  host="$(docker network inspect kind -f '{{range .IPAM.Config}}{{.Gateway}} {{end}}' | tr ' ' '\n' | grep -m1 '\.')"
  listen="$host"
else
  host=host.docker.internal
  listen=127.0.0.1
fi
nohup "$python" -m localcluster.dcgm_sim --kubeconfig "$kubeconfig" --listen 127.0.0.1:9400 \
  > "$state/dcgm-sim.log" 2>&1 &
echo $! > "$state/dcgm-sim.pid"
mkdir -p "$state/targets" "$state/prometheus"
"$python" -c 'import sys; from pathlib import Path; from localcluster.cluster import prometheus_config
prometheus_config(Path(sys.argv[1]), "127.0.0.1:9400", Path(sys.argv[2]), 5)' \
  "$state/prometheus.yml" "$state/targets"
nohup prometheus --config.file="$state/prometheus.yml" --storage.tsdb.path="$state/prometheus" \
  --web.listen-address="$listen:9090" > "$state/prometheus.log" 2>&1 &
echo $! > "$state/prometheus.pid"

docker build -t gpuyard:dev "$root"
kind load docker-image gpuyard:dev --name "$name"
kubectl create namespace gpuyard-system --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace gpuyard-system --overwrite pod-security.kubernetes.io/enforce=restricted
helm upgrade --install gpuyard "$root/charts/gpuyard" --namespace gpuyard-system --wait \
  --set image.repository=gpuyard --set image.tag=dev --set image.pullPolicy=Never \
  --set operator.clusterId="kind-$name" --set operator.prometheusUrl="http://$host:9090"

echo "kind-up: ready. export KUBECONFIG=$kubeconfig; DCGM simulator load API on http://127.0.0.1:9400/load"
