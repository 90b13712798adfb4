"""A site's side of SecAgg+ on the Message API: a ``train`` mod (``secagg_mod``).

Flower's ``secaggplus_mod`` runs the same four stages, but its masked-vector stage reads the reply
as a legacy ``FitRes`` (``recorddict_to_fitres``: ``fitres.parameters`` records), which medflower's
Message-API train replies are not, and it masks the whole model under the site's own
``num_examples``. This mod reuses Flower's stage functions where they fit and replaces only that
stage:

* setup, share keys, unmask: Flower's own ``_setup``, ``_share_keys``, ``_unmask``,
  ``check_stage``, ``check_configs`` and ``SecAggPlusState`` (key pairs, Shamir shares of the
  mask seed and of the key-agreement secret, encrypted for each neighbour; flwr is pinned, so
  importing these module-level functions is safe);
* collect masked vectors (written here): train as usual (``call_next``, inside the client-DP mod,
  so a clipped update is what gets masked), decrypt the neighbours' shares (as Flower does),
  quantize the update and its weight (:mod:`medflower.secagg`), add the private mask and the
  pairwise masks, and reply with only the masked integers (``keys.SECAGG_MASKED``), the scalar
  metrics, the site's name and the SHA-256 of its mask seed (a commitment Flower's protocol lacks:
  the coordinator checks the seed it rebuilds from the neighbours' shares against it, so a wrong
  share is caught and its sender named). The plaintext arrays never leave the site.

A message without Flower's ``secaggplus_configs`` record is a plain train message and passes through.
A refusal or an error at the masked stage goes back unchanged: the coordinator then treats the site
as dropped and removes its pairwise masks from the others' vectors.
"""

from __future__ import annotations

import hashlib
from logging import WARNING
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod.secure_aggregation.secaggplus_mod import (
    SecAggPlusState,
    _setup,
    _share_keys,
    _unmask,
    check_configs,
    check_stage,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen, share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from medflower import keys, records
from medflower.secagg import CLIPPED, SEED_DIGEST, Groups, quantize_groups, wire_dtype


def is_protocol_only(msg: Message) -> bool:
    """A SecAgg+ stage message that trains nothing (setup, share keys, unmask): the hospital's guard does
    not count it as a training round."""
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return cfg is not None and cfg.get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS


def continues_round(msg: Message) -> bool:
    """A share-keys or unmask stage: it continues a round the site accepted at setup (the hospital's guard
    applies the site's policy at setup and at the training stage, not again here)."""
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return cfg is not None and cfg.get(Key.STAGE) in (Stage.SHARE_KEYS, Stage.UNMASK)


def secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Answer one SecAgg+ stage (see the module doc); plain messages pass through."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    if RECORD_KEY_STATE not in ctxt.state.config_records:
        ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord({})
    state = SecAggPlusState(**ctxt.state.config_records[RECORD_KEY_STATE])
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    check_stage(state.current_stage, configs)
    state.current_stage = cast(str, configs.pop(Key.STAGE))
    weighting = str(configs.pop(keys.SECAGG_WEIGHTING, "examples"))
    check_configs(state.current_stage, configs)
    content = RecordDict()
    if state.current_stage == Stage.SETUP:
        state.nid = int(msg.metadata.dst_node_id)
        res = _setup(state, configs)
    elif state.current_stage == Stage.SHARE_KEYS:
        res = _share_keys(state, configs)
    elif state.current_stage == Stage.COLLECT_MASKED_VECTORS:
        del msg.content[RECORD_KEY_CONFIGS]  # the train handler and its mods see a plain train message
        reply = call_next(msg, ctxt)
        if reply.has_error() or keys.ARRAYS not in reply.content.array_records:
            ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
            return reply  # a refusal or an error: the site drops out of this round's sum
        neighbours = receive_shares(state, configs)
        content = reply.content
        masked, clipped = masked_update(state, neighbours, msg, content, weighting=weighting)
        for name in list(content.array_records):
            del content[name]
        content[keys.SECAGG_MASKED] = masked
        next(iter(content.metric_records.values()))[CLIPPED] = clipped
        res = {SEED_DIGEST: hashlib.sha256(state.rd_seed).digest()}  # the coordinator checks the rebuilt seed
    elif state.current_stage == Stage.UNMASK:
        res = _unmask(state, configs)
    else:  # check_stage has refused anything else already
        raise ValueError(f"unknown SecAgg+ stage {state.current_stage!r}")
    ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(res, False)
    return Message(content, reply_to=msg)


def receive_shares(state: SecAggPlusState, configs: ConfigRecord) -> list[int]:
    """Decrypt the shares the neighbours sent (as Flower's ``_collect_masked_vectors``); their node ids."""
    ciphertexts = cast(list[bytes], configs[Key.CIPHERTEXT_LIST])
    srcs = cast(list[int], configs[Key.SOURCE_LIST])
    if len(ciphertexts) + 1 < state.threshold:
        raise ValueError("SecAgg+: fewer neighbours than the reconstruction threshold")
    available = []
    for src, ciphertext in zip(srcs, ciphertexts, strict=True):
        plaintext = decrypt(state.ss2_dict[src], ciphertext)
        actual_src, dst, rd_seed_share, sk1_share = share_keys_plaintext_separate(plaintext)
        if actual_src != src or dst != state.nid:
            raise ValueError(f"SecAgg+: node {state.nid} got a share from {actual_src} for {dst}, forwarded as {src}")
        state.rd_seed_share_dict[src] = rd_seed_share
        state.sk1_share_dict[src] = sk1_share
        available.append(src)
    return available


def masked_update(
    state: SecAggPlusState, neighbours: list[int], msg: Message, content: RecordDict, *, weighting: str
) -> tuple[ArrayRecord, int]:
    """The reply's arrays as one masked integer vector (see :mod:`medflower.secagg` for the layout)."""
    global_arrays = records.arrays(msg, keys.ARRAYS)
    groups: Groups = {}
    for name, record in content.array_records.items():
        arrays = {k: np.asarray(record[k].numpy(), dtype=np.float64) for k in sorted(record.keys())}
        if name == keys.ARRAYS:  # the update, not the model
            arrays = {k: a - np.asarray(global_arrays[k].numpy(), dtype=np.float64) for k, a in arrays.items()}
        groups[name] = arrays
    metrics = next(iter(content.metric_records.values()))
    examples = float(cast(float, metrics.get(keys.NUM_EXAMPLES, 0.0)))
    weight = state.max_weight if weighting == "uniform" else examples
    if weight > state.max_weight:
        log(WARNING, "SecAgg+: weight %s capped at secure_aggregation.max_weight %s", weight, state.max_weight)
    names, vector, clipped = quantize_groups(
        groups,
        weight=weight,
        max_weight=state.max_weight,
        clipping_range=state.clipping_range,
        quantization_range=state.target_range,
    )
    shapes = [a.shape for a in vector]
    vector = parameters_addition(vector, pseudo_rand_gen(state.rd_seed, state.mod_range, shapes))
    for node_id in neighbours:
        shared_key = generate_shared_key(
            bytes_to_private_key(state.sk1), bytes_to_public_key(state.public_keys_dict[node_id][0])
        )
        pairwise = pseudo_rand_gen(shared_key, state.mod_range, shapes)
        op = parameters_addition if state.nid > node_id else parameters_subtraction
        vector = op(vector, pairwise)
    vector = parameters_mod(vector, state.mod_range)
    dtype = wire_dtype(state.mod_range)
    return ArrayRecord(
        {n: Array(np.array(a, dtype=dtype, order="C")) for n, a in zip(names, vector, strict=True)}
    ), clipped
