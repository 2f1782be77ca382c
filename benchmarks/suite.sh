#!/usr/bin/env bash
# The whole benchmark suite in one command; every script appends a dated section to BENCHMARKS.md.
#   bash benchmarks/suite.sh          # on a GPU machine: the GPU tables of BENCHMARKS.md (H100 settings);
#                                     # CIFAR_DIR (default /tmp/cifar10) is the CIFAR-10 image folder
#   bash benchmarks/suite.sh --cpu    # on a CPU: the same scripts at sizes that finish in minutes
set -euo pipefail
cd "$(dirname "$0")"
if [[ "${1:-}" == "--cpu" ]]; then
  python step_time.py --models hamiltonian-74 --blocks 18 100 --channels 32 --batch 8 --repeats 5 --record
  python memory_vs_depth.py --blocks 6 18 100 300 1000 --channels 16 32 64 --batch 8 --record
  python floor.py --amp bfloat16
else
  python step_time.py --models hamiltonian-74 midpoint-26 leapfrog-26 revnet-38 --blocks 18 100 300 --record
  python memory_vs_depth.py --record
  python deep.py --record
  python deep.py --amp bfloat16 --record
  python throughput.py --record
  python floor.py --amp bfloat16 --record
  python compile.py --device cuda --record
  python train_cifar.py --data-dir "${CIFAR_DIR:-/tmp/cifar10}" --record
fi
