"""Message keys both apps agree on. Changing one is a protocol change: bump ``PROTOCOL``."""

PROTOCOL = 1

# RecordDict keys
ARRAYS = "arrays"  # ArrayRecord: model weights (state_dict order)
CONFIG = "config"  # ConfigRecord: server -> client instructions
METRICS = "metrics"  # MetricRecord: client -> server scalars
SITE = "site"  # ConfigRecord in replies: the site's public name (no paths, no patient data)

# ConfigRecord keys (server -> client)
SERVER_ROUND = "server-round"  # injected by Flower's strategies
EXPERIMENT = "experiment-json"  # the resolved ExperimentConfig as JSON
EVAL_SPLIT = "eval-split"  # "val" (default) or "test"

# MetricRecord keys (client -> server)
NUM_EXAMPLES = "num-examples"  # samples (not batches) the update or evaluation used (as the site reports it)
AGG_WEIGHT = "aggregation-weight"  # set by the coordinator on every reply before aggregation (strategy.weighting);
# whatever a site sends under this key is overwritten: a weight is never trusted from a site
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
SITE_NAME = "site-name"
SCORE_HIST = "score-hist-"  # MetricRecord list[int] (evaluate, val split, binary): <split>-score-hist-<class>,
# counts of the positive-class score in medflower.threshold.BINS log-odds bins per true class (federated threshold)
PREPARATION = "preparation"  # ConfigRecord SITE in a reply: how the site prepared its images (no paths)
REFUSAL = "refusal"  # ConfigRecord SITE in a reply: the site refuses this message (the rule, and why); no arrays

# run_config keys (pyproject [tool.flwr.app.config] / `flwr run --run-config`)
RUN_EXPERIMENT = "experiment"  # path to an experiment YAML; "" = embedded quick start
RUN_OUTPUT = "output-dir"
RUN_SITE_DIRECTORY = "site-directory"  # deployment: registered node id -> site name (medflower.server.identity)
ENV_SITE_DIRECTORY = "MEDFLOWER_SITE_DIRECTORY"  # the same, set by deploy/start-coordinator.sh

# node_config keys
NODE_PARTITION_ID = "partition-id"  # simulation: which simulated site this node is
NODE_NUM_PARTITIONS = "num-partitions"
NODE_SITE_CONFIG = "site-config"  # deployment: path to the hospital's site YAML

# Each aggregation method declares its own message keys in its module
# (medflower/strategies/methods/*.py, as Method.message_keys); the registry refuses a clash.

# differential privacy (see client/privacy.py and strategies/privacy.py); absent when privacy.mode is none
DP_EPSILON = "dp-epsilon"  # MetricRecord: epsilon spent so far (site ledger in mode sample; federation in client)
DP_DELTA = "dp-delta"  # MetricRecord: the delta that epsilon is stated at
DP_TARGET_EPSILON = "dp-target-epsilon"  # MetricRecord: the site's (strictest) budget
DP_EPSILON_NEXT = "dp-epsilon-next"  # MetricRecord: epsilon after one more round of the same size
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"  # MetricRecord
DP_STEPS = "dp-steps"  # MetricRecord: entries in the site's ledger (whole run): DP-SGD steps
# (plus the 2 releases of privacy.feature_stats_noise, client/featurestats.py)
DP_EXHAUSTED = "dp-budget-exhausted"  # MetricRecord 0/1: 1 = the site refused to train (budget)
DP_CLIPPING_NORM = "dp-clipping-norm"  # MetricRecord (server, mode client): the clipping norm used
NODE_DP_TARGET_EPSILON = "dp-target-epsilon"  # node_config: the hospital's own (stricter) epsilon
NODE_DP_TARGET_DELTA = "dp-target-delta"  # node_config: the hospital's own (stricter) delta
NODE_CHECKPOINT_DIR = "checkpoint-dir"  # node_config: where the site keeps its checkpoint (DP ledger)
NODE_STATE_DIR = "state-dir"  # node_config: the hospital's state folder (privacy ledgers, audit log; client/state.py)

# secure aggregation (SecAgg+, medflower/secagg.py); the stage ConfigRecord is Flower's "secaggplus_configs"
SECAGG_MASKED = "secagg-masked"  # ArrayRecord in a train reply: the site's masked, quantized update (only that)
SECAGG_WEIGHTING = "secagg-weighting"  # stage config (masked stage): "examples" or "uniform"

# bench/deploy_rounds.py: a node started with this environment variable set to "1" adds
# COMPUTE_SECONDS (its ClientApp's handling of the message) to each reply's metrics (client/app.py)
SITE_TIMING_ENV = "MEDFLOWER_SITE_TIMING"
COMPUTE_SECONDS = "compute-seconds"

# the head's input statistics released under DP before round 1 (privacy.feature_stats_noise; medflower/featurestats.py).
# A "query" message; ConfigRecord keys (server -> client):
FEATURE_STATS_STAGE = "feature-stats-stage"  # "mean" (clipped features) or "var" (clipped squared deviations)
FEATURE_STATS_BOUND = "feature-stats-bound"  # the L2 bound each image's row is clipped to
FEATURE_STATS_CENTRE = "feature-stats-centre"  # list[float], stage "var": the federation's (noisy) mean
# MetricRecord key (client -> server): list[float], the site's noised sum (with NUM_EXAMPLES, its public count)
FEATURE_SUM = "feature-sum"
