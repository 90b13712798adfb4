"""The coordinator's side of SecAgg+ (Bell et al., CCS 2020) as a stage of medflower's round.

Flower's ``SecAggPlusWorkflow`` runs the protocol only inside its legacy ``DefaultWorkflow``: it
needs a ``LegacyContext``, legacy ``FitIns``/``FitRes`` and a ``ClientManager``; medflower's round
(:mod:`medflower.server.loop`) runs on the Message API. This driver, written here because Flower
lacks it, takes the place of the round's send/collect step: it runs the four stages over the
round's ``Grid`` with the train messages the strategy configured, and hands back replies the rest
of the round (screens, weighting, Flower's aggregation, records) treats as usual. Each of those
replies carries the *unmasked weighted mean* in place of the site's own arrays, so a Flower
strategy that needs only the mean (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx, and
SCAFFOLD with its uniformly averaged control variates) aggregates exactly as before; the
compatibility with every method is declared in the method registry and checked at load time.

Stages (Flower's names; the sites' half is :mod:`medflower.client.secagg`):

1. ``setup``: the sampled sites make two key pairs and send the public keys;
2. ``share_keys``: each site gets its neighbours' public keys (a ring of ``num_shares``, as in
   Flower) and sends, encrypted for each neighbour, Shamir shares of its mask seed and of its
   key-agreement secret;
3. ``collect_masked_vectors``: each site gets the shares addressed to it and the ordinary train
   message, trains, and sends its quantized, weighted update plus a private mask and pairwise masks
   (:mod:`medflower.secagg`); the coordinator sums the vectors;
4. ``unmask``: the surviving sites send, for each neighbour, the share of its seed (it sent a
   vector) or of its secret (it dropped after sharing keys); the coordinator rebuilds them, removes
   the masks and divides the sums by the summed weights.

Reconstruction needs ``reconstruction_threshold`` shares per site. A site that fails at any stage is
a failure of the round (named, with the stage); if fewer than the threshold remain the round is not
aggregated, and the round's ``secure_aggregation.not_aggregated`` in summary.json says why.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.logger import log
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key, public_key_to_bytes

from medflower import keys, records
from medflower.config.secagg import SecureAggregationConfig, quantization_error_bound
from medflower.secagg import CLIPPED, SEED_DIGEST, Layout, dequantize_sum, layout
from medflower.server.screens import spec_of
from medflower.strategies.registry import Spec

if TYPE_CHECKING:
    from medflower.server.loop import RoundPipeline, RoundRecord


MAX_SUBSETS = 256  # subsets of a secret's shares tried when some are wrong (see SecAggPlus._rebuild)


class SecAggAborted(RuntimeError):
    """Too few sites remain to finish the protocol: the round is not aggregated (the message says why)."""


@dataclass
class _State:
    """One round of the protocol (nothing is kept across rounds)."""

    round: int
    train: dict[int, Message]  # node id -> the strategy's train message
    neighbours: dict[int, set[int]] = field(default_factory=dict)
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    passthrough: list[Message] = field(default_factory=list)  # refusals: the round's screens record them
    unmasked: int = 0  # sites that answered the unmask stage
    seed_digests: dict[int, bytes] = field(default_factory=dict)  # SHA-256 of each masked vector's seed


class SecAggPlus:
    """The SecAgg+ stage of a round (see the module doc); ``reply_spec`` is the method's reply layout."""

    def __init__(
        self,
        *,
        config: SecureAggregationConfig,
        weighting: str,
        reply_spec: Callable[[Spec], dict[str, Spec]],
    ) -> None:
        self.config = config
        self.weighting = "uniform" if weighting == "uniform" else "examples"
        self.reply_spec = reply_spec

    # -- the round ---------------------------------------------------------------------------------

    def run(
        self, pipe: RoundPipeline, server_round: int, msgs: list[Message], arrays: ArrayRecord, rec: RoundRecord
    ) -> list[Message]:
        """Replies for the round's screens: the sites' metrics with the unmasked mean, and any refusals."""
        st = _State(round=server_round, train={int(m.metadata.dst_node_id): m for m in msgs})
        info = rec.secure_aggregation
        info.update(mode="secagg+", sampled=len(msgs))
        try:
            return self._run(pipe, st, arrays, info) + st.passthrough
        except SecAggAborted as err:
            info["not_aggregated"] = str(err)
            log(ERROR, "round %d: secure aggregation stopped: %s; global model unchanged", server_round, err)
            return st.passthrough
        finally:
            rec.failures.extend(st.failures)

    def _run(self, pipe: RoundPipeline, st: _State, arrays: ArrayRecord, info: dict[str, Any]) -> list[Message]:
        cfg = self.config
        sampled = sorted(st.train)
        shares, threshold = self._ring(st, sampled)
        info.update(num_shares=shares, reconstruction_threshold=threshold)
        keyed = self._setup(pipe, st, sampled, shares, threshold)
        info["setup"] = len(keyed)
        forward = self._share_keys(pipe, st, keyed)
        info["share_keys"] = len(forward)
        expected = layout(self.reply_spec(spec_of(arrays)))
        masked, replies = self._collect(pipe, st, forward, expected)
        info["collect_masked_vectors"] = len(masked)
        dead = set(forward) - set(masked)
        total = self._unmask(pipe, st, masked, dead, expected)
        info["unmask"] = st.unmasked
        info["recovered_dropouts"] = sorted(pipe.site(n) for n in dead)
        entries = {name: arr for (name, _), arr in zip(expected, total, strict=True)}
        means, totals = dequantize_sum(
            entries,
            num_sites=len(masked),
            clipping_range=cfg.clipping_range,
            quantization_range=cfg.quantization_range,
        )
        model_ratio = totals.get(keys.ARRAYS, 0.0)
        info["weight_sum"] = model_ratio * cfg.max_weight
        info["quantization_error_bound"] = quantization_error_bound(cfg, num_sites=len(masked), total_ratio=model_ratio)
        info["clipped_coordinates"] = sum(_metric(m, CLIPPED) for m in replies)
        self._check_weights(st, replies, info["weight_sum"], info)
        if keys.ARRAYS not in means:
            raise SecAggAborted("the sites' weights sum to 0: there is no mean to take")
        log(INFO, "round %d: secure aggregation unmasked the sum of %d site(s)", st.round, len(masked))
        return self._replies(replies, means, arrays)

    def _check_weights(self, st: _State, replies: list[Message], masked_sum: float, info: dict[str, Any]) -> None:
        """The masked weights' sum against the weights the sites' plaintext ``num-examples`` imply: a site that
        claims one number in the clear and weighs its update by another shows here (not which site)."""
        cap = self.config.max_weight
        claims = [cap if self.weighting == "uniform" else min(_metric(m, keys.NUM_EXAMPLES), cap) for m in replies]
        tolerance = len(replies) * cap / self.config.quantization_range + 1e-9 * cap
        if abs(sum(claims) - masked_sum) > tolerance:
            info["weight_mismatch"] = {"masked": masked_sum, "claimed": sum(claims)}
            log(
                WARNING,
                "round %d: the sites' masked weights sum to %.3f, their reported examples imply %.3f",
                st.round,
                masked_sum,
                sum(claims),
            )

    def _ring(self, st: _State, sampled: list[int]) -> tuple[int, int]:
        """Flower's neighbour ring: ``num_shares`` clamped to the sample (odd unless it is all of it)."""
        n, threshold = len(sampled), self.config.reconstruction_threshold
        if n < threshold:
            raise SecAggAborted(f"{n} site(s) sampled, secure_aggregation.reconstruction_threshold is {threshold}")
        shares = min(self.config.num_shares, n)
        if shares < n and shares % 2 == 0:
            shares += 1
        order = list(sampled)
        random.Random(st.round).shuffle(order)  # who shares with whom is public; reproducible per round
        half = shares >> 1
        for i, nid in enumerate(order):
            st.neighbours[nid] = {order[(i + o) % n] for o in range(-half, half + 1)}
        return shares, threshold

    # -- stages ------------------------------------------------------------------------------------

    def _stage_message(self, st: _State, nid: int, stage_config: dict[str, Any], *, train: bool = False) -> Message:
        """A stage's message: the train message's config (the hospital's guard reads the experiment in it),
        and the whole train message (model, control variates) at the masked stage only."""
        src = st.train[nid].content
        content = (
            RecordDict(dict(src)) if train else RecordDict({keys.CONFIG: records.config(st.train[nid], keys.CONFIG)})
        )
        content[RECORD_KEY_CONFIGS] = ConfigRecord(stage_config)
        return Message(content=content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=str(st.round))

    def _exchange(self, pipe: RoundPipeline, st: _State, stage: str, msgs: list[Message]) -> dict[int, ConfigRecord]:
        """Send one stage; each answering site's stage record. Errors and silences are failures; other
        answers (a site's refusal) go to the round's screens."""
        replies = pipe.send(msgs, server_round=st.round, stage=stage)
        dst = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in msgs}
        got: dict[int, ConfigRecord] = {}
        for msg in replies:
            nid = dst.get(msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id))
            if msg.has_error():
                self._fail(pipe, st, nid, stage, str(msg.error.reason))
            elif RECORD_KEY_CONFIGS not in msg.content.config_records:
                st.passthrough.append(msg)
            else:
                got[nid] = msg.content.config_records[RECORD_KEY_CONFIGS]
        answered = set(got) | {int(m.metadata.src_node_id) for m in replies}
        for m in msgs:
            nid = int(m.metadata.dst_node_id)
            if nid not in answered:
                self._fail(pipe, st, nid, stage, f"no reply within round_timeout={pipe.timeout:.0f}s")
        return got

    def _fail(self, pipe: RoundPipeline, st: _State, nid: int, stage: str, reason: str) -> None:
        st.failures.append({"site": pipe.site(nid), "node_id": nid, "stage": stage, "reason": reason})
        log(WARNING, "round %d: secure aggregation, stage %s: %s: %s", st.round, stage, pipe.site(nid), reason)

    def _enough(self, st: _State, stage: str, remaining: int) -> None:
        if remaining < self.config.reconstruction_threshold:
            raise SecAggAborted(
                f"after stage {stage}, {remaining} site(s) remain, fewer than "
                f"secure_aggregation.reconstruction_threshold {self.config.reconstruction_threshold}"
            )

    def _setup(self, pipe: RoundPipeline, st: _State, sampled: list[int], shares: int, threshold: int) -> list[int]:
        cfg = self.config
        setup = {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: len(sampled),
            Key.SHARE_NUMBER: shares,
            Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: float(cfg.clipping_range),
            Key.TARGET_RANGE: int(cfg.quantization_range),
            Key.MOD_RANGE: int(cfg.modulus_range),
            Key.MAX_WEIGHT: float(cfg.max_weight),
        }
        got = self._exchange(pipe, st, Stage.SETUP, [self._stage_message(st, n, setup) for n in sampled])
        for nid, res in got.items():
            pk1, pk2 = res.get(Key.PUBLIC_KEY_1), res.get(Key.PUBLIC_KEY_2)
            if isinstance(pk1, bytes) and isinstance(pk2, bytes):
                st.public_keys[nid] = (pk1, pk2)
            else:
                self._fail(pipe, st, nid, Stage.SETUP, "malformed reply: no public keys")
        self._enough(st, Stage.SETUP, len(st.public_keys))
        return sorted(st.public_keys)

    def _share_keys(
        self, pipe: RoundPipeline, st: _State, keyed: list[int]
    ) -> dict[int, tuple[list[int], list[bytes]]]:
        """Returns, for every site that shared its keys, the (sources, ciphertexts) addressed to it."""
        alive = set(keyed)
        msgs = []
        for nid in keyed:
            stage = {str(n): list(st.public_keys[n]) for n in sorted(st.neighbours[nid] & alive)}
            msgs.append(self._stage_message(st, nid, {**stage, Key.STAGE: Stage.SHARE_KEYS}))
        got = self._exchange(pipe, st, Stage.SHARE_KEYS, msgs)
        sent: dict[int, list[tuple[int, bytes]]] = {}
        for nid, res in got.items():
            pairs = _pairs(res, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST, st.neighbours[nid])
            if pairs is None:
                self._fail(pipe, st, nid, Stage.SHARE_KEYS, "malformed shares: excluded")
                continue
            sent[nid] = pairs
        self._enough(st, Stage.SHARE_KEYS, len(sent))
        forward: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in sent}
        for src, pairs in sent.items():
            for dst, ctxt in pairs:
                if dst in forward:
                    forward[dst][0].append(src)
                    forward[dst][1].append(ctxt)
        return forward

    def _collect(
        self, pipe: RoundPipeline, st: _State, forward: dict[int, tuple[list[int], list[bytes]]], expected: Layout
    ) -> tuple[dict[int, list[np.ndarray]], list[Message]]:
        """Train and mask: each site's masked vector (in ``expected``'s order) and its reply."""
        msgs = []
        for nid, (srcs, ctxts) in forward.items():
            stage = {
                Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                Key.CIPHERTEXT_LIST: ctxts,
                Key.SOURCE_LIST: srcs,
                keys.SECAGG_WEIGHTING: self.weighting,
            }
            msgs.append(self._stage_message(st, nid, stage, train=True))
        failures: list[dict[str, Any]] = []
        ok = pipe.collect(
            st.round, msgs, pipe.send(msgs, server_round=st.round), failures
        )  # learns the sites' names (simulation)
        st.failures += [f | {"stage": Stage.COLLECT_MASKED_VECTORS} for f in failures]
        masked: dict[int, list[np.ndarray]] = {}
        replies = []
        for msg in ok:
            nid = int(msg.metadata.src_node_id)
            if keys.SECAGG_MASKED not in msg.content.array_records:
                st.passthrough.append(msg)  # a refusal: no update, the screens record it
                continue
            vector, why = self._check_vector(msg.content.array_records[keys.SECAGG_MASKED], expected)
            digest = msg.content.config_records.get(RECORD_KEY_CONFIGS, ConfigRecord()).get(SEED_DIGEST)
            if vector is not None and not isinstance(digest, bytes):
                vector, why = None, f"no {SEED_DIGEST!r} commitment"
            if vector is None:
                self._fail(pipe, st, nid, Stage.COLLECT_MASKED_VECTORS, f"rejected masked vector: {why}")
                continue
            masked[nid] = vector
            st.seed_digests[nid] = cast(bytes, digest)
            replies.append(msg)
        self._enough(st, Stage.COLLECT_MASKED_VECTORS, len(masked))
        return masked, replies

    def _check_vector(self, record: ArrayRecord, expected: Layout) -> tuple[list[np.ndarray] | None, str]:
        if set(record.keys()) != {name for name, _ in expected}:
            return None, "its entries are not the ones this round's model calls for"
        out = []
        for name, shape in expected:
            a = record[name].numpy()
            if tuple(a.shape) != tuple(shape) or np.dtype(a.dtype).kind not in "iu":
                return None, f"entry {name!r} has shape {tuple(a.shape)} and dtype {a.dtype}, expected {shape} integers"
            a = a.astype(np.int64)
            if a.size and (a.min() < 0 or a.max() >= self.config.modulus_range):
                return None, f"entry {name!r} is outside [0, modulus_range)"
            out.append(a)
        return out, ""

    def _unmask(
        self,
        pipe: RoundPipeline,
        st: _State,
        masked: dict[int, list[np.ndarray]],
        dead: set[int],
        expected: Layout,
    ) -> list[np.ndarray]:
        """The sum of the masked vectors with every mask removed (modulo ``modulus_range``)."""
        mod = self.config.modulus_range
        survivors = sorted(masked)
        total = masked[survivors[0]]
        for nid in survivors[1:]:
            total = parameters_mod(parameters_addition(total, masked[nid]), mod)
        msgs, asked = [], {}
        for nid in survivors:
            active, gone = sorted(st.neighbours[nid] & set(survivors)), sorted(st.neighbours[nid] & dead)
            asked[nid] = set(active) | set(gone)
            msgs.append(
                self._stage_message(
                    st, nid, {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: gone}
                )
            )
        got = self._exchange(pipe, st, Stage.UNMASK, msgs)
        st.unmasked = len(got)
        collected: dict[int, list[tuple[int, bytes]]] = {n: [] for n in set(survivors) | dead}
        for nid, res in got.items():
            pairs = _pairs(res, Key.NODE_ID_LIST, Key.SHARE_LIST, asked[nid])
            if pairs is None:
                self._fail(pipe, st, nid, Stage.UNMASK, "malformed shares: excluded")
                continue
            for owner, share in pairs:
                collected[owner].append((nid, share))
        shapes = [tuple(shape) for _, shape in expected]
        for owner, shares in sorted(collected.items()):
            secret = self._rebuild(pipe, st, owner, shares, sent_vector=owner in masked)
            total = self._remove_masks(st, owner, secret, owner in masked, masked, total, shapes)
        return parameters_mod(total, mod)

    def _rebuild(
        self, pipe: RoundPipeline, st: _State, owner: int, shares: list[tuple[int, bytes]], *, sent_vector: bool
    ) -> bytes:
        """``owner``'s mask seed (it sent a vector) or key-agreement secret (it dropped), checked against what
        it committed to: the SHA-256 of its seed (sent with its vector) or its public key (sent at setup).

        Flower's workflow combines the shares it gets and trusts the result; a site that sends a wrong share
        would silently corrupt the sum. Here, when all shares do not rebuild the committed secret, subsets
        with fewer shares are tried (largest first, at most ``MAX_SUBSETS``): the shares left out of the first
        subset that does are wrong, and their senders are named in the round's failures.
        """
        what = "mask seed" if sent_vector else "secret key"
        threshold = self.config.reconstruction_threshold
        if len(shares) < threshold:
            raise SecAggAborted(
                f"stage {Stage.UNMASK}: {len(shares)} share(s) of {pipe.site(owner)}'s {what}, "
                f"secure_aggregation.reconstruction_threshold is {threshold}"
            )
        commitment = st.seed_digests.get(owner) if sent_vector else st.public_keys[owner][0]
        tried = 0
        for size in range(len(shares), threshold - 1, -1):
            for subset in itertools.combinations(range(len(shares)), size):
                tried += 1
                if tried > MAX_SUBSETS:
                    break
                secret = _combine([shares[i][1] for i in subset])
                if secret is None or not _matches(secret, commitment, sent_vector=sent_vector):
                    continue
                for i in sorted(set(range(len(shares))) - set(subset)):
                    self._fail(
                        pipe,
                        st,
                        shares[i][0],
                        Stage.UNMASK,
                        f"sent a wrong share of {pipe.site(owner)}'s {what}: not used",
                    )
                return secret
        raise SecAggAborted(
            f"stage {Stage.UNMASK}: no {threshold} of the {len(shares)} shares of {pipe.site(owner)}'s {what} "
            "rebuild it (wrong shares)"
        )

    def _remove_masks(
        self,
        st: _State,
        owner: int,
        secret: bytes,
        sent_vector: bool,
        masked: dict[int, list[np.ndarray]],
        total: list[np.ndarray],
        shapes: list[tuple[int, ...]],
    ) -> list[np.ndarray]:
        """A live site's private mask, or a dropped site's pairwise masks with the live neighbours (as in
        Flower's ``SecAggPlusWorkflow.unmask_stage``, but only with neighbours that sent a vector)."""
        mod = self.config.modulus_range
        if sent_vector:
            return parameters_mod(parameters_subtraction(total, pseudo_rand_gen(secret, mod, shapes)), mod)
        private = bytes_to_private_key(secret)
        for other in sorted((st.neighbours[owner] & set(masked)) - {owner}):
            shared = generate_shared_key(private, bytes_to_public_key(st.public_keys[other][0]))
            pairwise = pseudo_rand_gen(shared, mod, shapes)
            op = parameters_addition if owner > other else parameters_subtraction
            total = parameters_mod(op(total, pairwise), mod)
        return total

    def _replies(
        self, replies: list[Message], means: dict[str, dict[str, np.ndarray]], arrays: ArrayRecord
    ) -> list[Message]:
        """Each surviving site's reply with the unmasked mean in place of its masked vector."""
        spec = self.reply_spec(spec_of(arrays))
        out: dict[str, ArrayRecord] = {}
        for record, rec_spec in spec.items():
            mean = means.get(record, {})
            if record == keys.ARRAYS:
                mean = {k: np.asarray(arrays[k].numpy(), dtype=np.float64) + v for k, v in mean.items()}
            out[record] = ArrayRecord({k: Array(_cast(mean[k], rec_spec[k][1])) for k in rec_spec if k in mean})
        for msg in replies:
            del msg.content[keys.SECAGG_MASKED]
            if RECORD_KEY_CONFIGS in msg.content.config_records:
                del msg.content[RECORD_KEY_CONFIGS]
            for record, rec in out.items():
                msg.content[record] = rec
        return replies


def _combine(shares: list[bytes]) -> bytes | None:
    """Flower's Shamir combination; None when the shares are not even well-formed."""
    try:
        return combine_shares(shares)
    except Exception:  # (Flower's Shamir code raises what its byte handling meets: ValueError, IndexError, ...)
        return None


def _matches(secret: bytes, commitment: bytes | None, *, sent_vector: bool) -> bool:
    """Whether a rebuilt secret is the one its owner committed to."""
    if commitment is None:
        return False
    if sent_vector:
        return hashlib.sha256(secret).digest() == commitment
    try:
        return public_key_to_bytes(bytes_to_private_key(secret).public_key()) == commitment
    except Exception:  # (not a private key at all: what the key parser raises depends on the bytes)
        return False


def _pairs(res: ConfigRecord, ids_key: str, bytes_key: str, allowed: set[int]) -> list[tuple[int, bytes]] | None:
    """A stage reply's (node id, bytes) pairs, or None when they are malformed (a site's shares must be
    addressed to nodes it was told about, one ciphertext or share per node)."""
    ids, blobs = res.get(ids_key), res.get(bytes_key)
    if not isinstance(ids, list) or not isinstance(blobs, list) or len(ids) != len(blobs):
        return None
    if not all(isinstance(i, int) and i in allowed for i in ids) or not all(isinstance(b, bytes) for b in blobs):
        return None
    return list(zip(cast(list[int], ids), cast(list[bytes], blobs), strict=True))


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    if np.dtype(dtype).kind in "iub":
        x = np.rint(x)
    return np.array(x.astype(dtype), order="C")


def _metric(msg: Message, key: str) -> float:
    m = next(iter(msg.content.metric_records.values()), None)
    value = m.get(key, 0.0) if m is not None else 0.0
    return 0.0 if isinstance(value, list) else float(value)
