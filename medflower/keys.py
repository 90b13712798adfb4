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
NUM_EXAMPLES = "num-examples"  # samples (not batches) the update or evaluation used
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
SITE_NAME = "site-name"

# run_config keys (pyproject [tool.flwr.app.config] / `flwr run --run-config`)
RUN_EXPERIMENT = "experiment"  # path to an experiment YAML; "" = embedded quick start
RUN_OUTPUT = "output-dir"

# node_config keys
NODE_PARTITION_ID = "partition-id"  # simulation: which simulated site this node is
NODE_NUM_PARTITIONS = "num-partitions"
NODE_SITE_CONFIG = "site-config"  # deployment: path to the hospital's site YAML
