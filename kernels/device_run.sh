#!/usr/bin/env bash
# One device call: install carried wheels, build the extension, run the kernel tests, run the
# benchmarks. Logs and result tables go to $OUT (default ./out). Usage: bash kernels/device_run.sh [stages]
# A carried kernels/_C*.so built from these sources (kernels/_C.sources.sha256) that imports is used as is
# (QAAS_REBUILD=1 rebuilds).
# stages: any of build,test,w4,bench,ncu,aqprof,aqtime,transform,kv,e2e (default build,test,bench,e2e).
set -u
export LC_ALL=C  # one glob order for the sources' hash (kernels/_C.sources.sha256) on every machine
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
STAGES=${1:-build,test,bench,e2e}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/env.log"
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/env.log"
# An extension built elsewhere for this torch (kernels/cross_build.sh) and carried with kernels/_C.sources.sha256:
# used as is when it was built from these very sources and imports here.
if [[ $STAGES == *build* ]] && [[ -z ${QAAS_REBUILD:-} ]] && ls kernels/_C*.so >/dev/null 2>&1 \
    && [[ "$(cat kernels/csrc/* kernels/build.py | sha256sum | cut -d' ' -f1)" == "$(cat kernels/_C.sources.sha256 2>/dev/null)" ]] \
    && python3 -c "import torch, kernels._C as c; print('prebuilt kernels/_C loads; sm90 GEMM:', c.has_sm90_gemm())" 2>"$OUT/prebuilt.log"; then
  STAGES=${STAGES//build/}
elif [[ $STAGES == *build* ]] && ls kernels/_C*.so >/dev/null 2>&1; then
  echo "carried kernels/_C not used: sources $(cat kernels/csrc/* kernels/build.py | sha256sum | cut -d' ' -f1), built from $(cat kernels/_C.sources.sha256 2>/dev/null)" | tee "$OUT/prebuilt.log"
fi
if [[ $STAGES == *build* ]]; then
  t0=$(date +%s)
  timeout 420 python3 -m kernels.build > "$OUT/build.log" 2>&1; rc=$?
  echo "build rc=$rc in $(( $(date +%s) - t0 ))s"; grep -E "error|registers|spill|bytes stack" "$OUT/build.log" | head -60
  [[ $rc -ne 0 ]] && { tail -40 "$OUT/build.log"; exit 1; }
fi
if [[ $STAGES == *test* ]]; then
  timeout 300 python3 -m pytest tests/kernels tests/benchmarks ${PYTEST_EXTRA:-} -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | grep -E "passed|failed|FAILED|Error" | head -40
fi
if [[ $STAGES == *w4* ]]; then
  # W4A16 decode only: its GPU tests, then every variant (incl. packed metadata, PDL) and the memory probes
  timeout 200 python3 -m pytest tests/kernels/test_cuda_kernels.py -k "w4a16 or memory_probe or dispatch" -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_w4.log" | grep -E "passed|failed|FAILED|Error" | head -40
  timeout 300 python3 -m benchmarks.kernels --sections w4a16 --tokens 1,16 --out "$OUT" > "$OUT/bench_w4.log" 2>&1
  tail -5 "$OUT/bench_w4.log" | grep -iE "error|Traceback" ; grep -E "^\| " "$OUT/kernels.md" | cut -d'|' -f2-6 | head -150
fi
if [[ $STAGES == *aqtime* ]]; then
  timeout 150 python3 -m benchmarks.act_quant_transform --out "$OUT" 2>&1 | tee "$OUT/act_quant_transform.log" | tail -14
fi
if [[ $STAGES == *bench* ]]; then
  timeout 420 python3 -m benchmarks.kernels --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -120
fi
if [[ $STAGES == *ncu* ]]; then
  NCU="ncu --clock-control none --launch-skip 2 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis"
  for v in ${NCU_W4_VARIANTS:-4}; do
    timeout 100 $NCU --kernel-name regex:w4a16 python3 -m kernels.profile_kernels w4a16 --k 4096 --n 4096 --variant $v > "$OUT/ncu_w4a16_v$v.txt" 2>&1
  done
  if [[ -z ${NCU_SKIP_ACT_QUANT:-} ]]; then
    timeout 100 $NCU --kernel-name regex:act_quant python3 -m kernels.profile_kernels act_quant --k 4096 --transform kronecker > "$OUT/ncu_act_quant_kron.txt" 2>&1
    timeout 100 $NCU --kernel-name regex:act_quant python3 -m kernels.profile_kernels act_quant --k 4096 --transform none > "$OUT/ncu_act_quant_none.txt" 2>&1
  fi
  for f in "$OUT"/ncu_*.txt; do echo "== $f"; grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|Warp Cycles Per Issued|No Eligible|L2 Hit|Dynamic Shared" "$f" | head -24; done
fi
if [[ $STAGES == *aqprof* ]]; then
  # act_quant detail: stall reasons, instruction mix and per-SASS-line counters of the transform kernels
  AQ="ncu --clock-control none --launch-skip 2 --launch-count 1 --kernel-name regex:act_quant --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section InstructionStats --section Occupancy --section MemoryWorkloadAnalysis --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
  for spec in "4096 kronecker" "11008 kronecker" "4096 none" "11008 none"; do
    set -- $spec
    timeout 120 $AQ python3 -m kernels.profile_kernels act_quant --k $1 --transform $2 > "$OUT/aq_$1_$2.txt" 2>&1
  done
  for k in 4096 11008; do
    timeout 150 ncu --clock-control none --launch-skip 2 --launch-count 1 --kernel-name regex:act_quant --section SourceCounters --page source --print-source sass --csv python3 -m kernels.profile_kernels act_quant --k $k --transform kronecker > "$OUT/aq_sass_$k.csv" 2>&1
  done
  for f in "$OUT"/aq_*.txt; do echo "== $f"; grep -E "Duration|Issue Slots Busy|Warp Cycles Per Issued|No Eligible|Executed Ipc A|stalled|inst_executed.sum|hmma" "$f" | head -40; done
fi
if [[ $STAGES == *transform* ]]; then
  # the online transform's cost: act_quant_s8 alone (incl. the left-only heads transform) and per decoder layer
  timeout 120 python3 -m benchmarks.act_quant_transform --out "$OUT" 2>&1 | tee "$OUT/act_quant_transform.log" | tail -12
  timeout 240 python3 -m benchmarks.kernels --sections layer --out "$OUT" > "$OUT/layer.log" 2>&1
  grep -E "LAYER" "$OUT/layer.log" | head -20
fi
if [[ $STAGES == *kv* ]]; then
  timeout 200 python3 -m benchmarks.kv_attention --out "$OUT" 2>&1 | tee "$OUT/kv_attention.log" | tail -40
fi
if [[ $STAGES == *e2e* ]]; then
  timeout 240 python3 -m benchmarks.e2e_generation --layers 8 --new-tokens 64 --out "$OUT" 2>&1 | tee "$OUT/e2e.log" | tail -12
fi
# the device tool returns a limited number of files: everything also goes into one archive, first by name
tar czf /tmp/0_all.tgz -C "$OUT" . && mv /tmp/0_all.tgz "$OUT/0_all.tgz"
