"""Mutation run: break the core modules on purpose, one break at a time, and check the tests notice.

    python tests/mutate.py            # every mutation (about 15 minutes on 2 idle cores)
    python tests/mutate.py --list     # what each one breaks
    python tests/mutate.py key-weights predict-rounding   # some of them

Each mutation replaces one exact snippet of one module of `featurecache/` (it must occur
there exactly once, so the list fails loudly when the code moves instead of testing
nothing) in a scratch copy of the repository, then runs the tests that guard that
behaviour. A mutation is *caught* when those tests fail, *survived* when they pass: a
survivor names a missing assertion. Not part of CI (too slow); its last result is in
RELIABILITY.md. Exit code 0 only when every mutation was caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
_IGNORED = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.egg-info", ".pytest_cache")


def IGNORED(folder: str, names: list[str]) -> set[str]:
    """What the scratch copy leaves out; `cache` only at the top (featurecache/cache/ is a package)."""
    top = {"cache"} & set(names) if Path(folder).resolve() == REPOSITORY else set()
    return set(_IGNORED(folder, names)) | top


@dataclass(frozen=True)
class Mutation:
    name: str
    module: str  # path under featurecache/
    original: str
    mutated: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    breaks: str  # the promise it breaks, in words


KEY = "tests/test_cache_key.py"
CROSS = "tests/test_cross_ensemble.py"
VIT = "tests/test_timm_fast_path.py"
FINETUNE = "tests/test_finetune.py"
MUTATIONS = [
    # The cache key: each field that changes the numbers, dropped from the entry's config.
    Mutation("key-weights", "extract/stage.py", '"weights_sha256": weights.sha256,', "",
             (f"{KEY}::test_key_field_weights",), "the weights' hash is in the key"),
    Mutation("key-model", "extract/stage.py", '"arch": entry.name,', "",
             (f"{KEY}::test_key_field_model",), "the architecture is in the key"),
    Mutation("key-taps", "extract/stage.py", '"taps": list(taps),', "",
             (f"{KEY}::test_key_field_tap",), "the taps are in the key"),
    Mutation("key-preprocessing", "extract/stage.py", '"preprocessing": {**preprocessing.to_dict(), ',
             '"preprocessing": {', (KEY, "-k", "image_size or resize"), "the preprocessing is in the key"),
    Mutation("key-interpolation", "backbones/registry.py", '"interpolation": self.interpolation,', "",
             (KEY, "-k", "resize"), "the resize interpolation is in the key"),
    Mutation("key-precision", "extract/stage.py", '"precision": precision,\n        "source"', '"source"',
             (f"{KEY}::test_key_field_forward_precision",), "the forward precision is in the key"),
    Mutation("key-dtype", "extract/stage.py", '"dtype": spec.dtype,\n        "precision"', '"precision"',
             (f"{KEY}::test_key_field_storage_dtype",), "the storage dtype is in the key"),
    Mutation("key-draft", "extract/stage.py", '**({"jpeg_draft": True} if spec.draft else {})', "",
             (f"{KEY}::test_key_field_draft",), "--draft is in the key"),
    # Fingerprints and planning: which rows are reused.
    Mutation("fingerprint-mtime", "data/sources.py", "stat.st_size, stat.st_mtime_ns, class_name", "stat.st_size, class_name",
             (KEY, "-k", "rewritten"), "a file rewritten in place is recomputed"),
    Mutation("fingerprint-content", "data/sources.py", "return _fingerprint(relpath, digest, class_name, split)",
             "return _fingerprint(relpath, class_name, split)", (KEY, "-k", "content_hash"),
             "--content-hash sees new content behind the same size and mtime"),
    Mutation("plan-reuse-stale-rows", "extract/plan.py", "[f in current and f not in covered for f in fingerprints]",
             "[f not in covered for f in fingerprints]",
             ("tests/test_extract.py::test_incremental_add_and_remove", KEY, "-k", "incremental or rewritten"),
             "removed or changed files do not keep their old rows"),
    Mutation("plan-recompute-everything", "extract/plan.py", "plan.to_compute = [s for s in source.samples if s.fingerprint not in covered]",
             "plan.to_compute = list(source.samples)",
             ("tests/test_extract.py", "-k", "incremental or resume or cache_hit"),
             "only new or changed files are computed"),
    # Checksums and the write path.
    Mutation("checksum-pread", "cache/shards.py", 'if "xxh3_64:" + hasher.hexdigest() != located["checksum"]:', "if False:",
             ("tests/test_extract.py", "tests/test_verify.py", "-k", "flipped or damage"),
             "a flipped feature byte is caught on read"),
    Mutation("checksum-h5py", "cache/shards.py", "if expected is not None and features_checksum(values) != expected:",
             "if False:", ("tests/test_extract.py", "-k", "flipped or any_rows"),
             "a flipped feature byte is caught by the row reader and h5py reads"),
    Mutation("verify-sha256", "maintain/verify.py", 'if file_sha256(file) != record["sha256"]:', "if False:",
             ("tests/test_verify.py",), "verify compares every shard with its SHA-256"),
    Mutation("shard-written-in-place", "cache/shards.py",
             'self.tmp_path = temporary_path(final_path)',
             "self.tmp_path = final_path", ("tests/test_crash.py", "-k", "sigkill_then_rerun"),
             "a shard under its final name is complete (temp file + rename)"),
    Mutation("manifest-before-shard", "extract/writer.py",
             '        add_shard(self.manifest, record, skipped)\n        self._commit_manifest()\n        fault_point("after_manifest")',
             '        add_skipped(self.manifest, skipped)\n        fault_point("after_manifest")',
             ("tests/test_extract.py", "-k", "resume or cache_hit"), "every committed shard is listed in the manifest"),
    Mutation("atomic-no-fsync", "cache/atomic.py", "        write(tmp)\n        fsync_file(tmp)\n", "        write(tmp)\n",
             ("tests/test_atomic.py",), "every artifact is fsynced before its rename"),
    Mutation("atomic-no-folder-fsync", "cache/atomic.py", "    os.replace(tmp, path)\n    fsync_directory(path.parent)",
             "    os.replace(tmp, path)", ("tests/test_atomic.py",), "every rename is made durable by a folder fsync"),
    Mutation("manifest-unvalidated-write", "cache/manifest.py", "    check_manifest(json.loads(text), path)\n", "",
             ("tests/test_manifest.py",), "every manifest write is validated by the schema first"),
    # The logistic solver.
    Mutation("logistic-ignores-C", "heads/logistic_path.py",
             "        strength = 1.0 / (Cs[index] * (penalty_rows or n))\n        change",
             "        strength = 1.0 / (penalty_rows or n)\n        change",
             ("tests/test_heads.py", "-k", "follows_C"), "the CPU logistic solver follows C"),
    Mutation("logistic-penalises-bias", "heads/logistic_path.py",
             "residual = self.frequencies - mean  # minus the bias gradient",
             "residual = self.frequencies - mean - self.strength * self.bias",
             ("tests/test_heads.py", "-k", "follows_C"), "the bias is not penalised, as in scikit-learn"),
    Mutation("torch-logistic-ignores-C", "heads/logistic_path.py",
             "        strength = 1.0 / (Cs[index] * (penalty_rows or n))\n        optimizer",
             "        strength = 1.0 / (penalty_rows or n)\n        optimizer",
             ("tests/test_heads.py", "-k", "torch_logistic"), "the torch (GPU) logistic solver follows C"),
    Mutation("lbfgs-no-step-refinement", "heads/lbfgs.py", "REFINEMENTS = 2 ", "REFINEMENTS = 0 ",
             ("tests/test_logistic_path.py", "-k", "step_search"), "a step far from the line's minimum is refined"),
    Mutation("fold-gradient-without-mean", "heads/logistic_path.py",
             "gradient = (gradient + np.outer(mean, self.residual))", "gradient = (gradient + 0 * np.outer(mean, self.residual))",
             ("tests/test_logistic_path.py", "-k", "folded_standardisation"),
             "the folded standardisation's gradient is the standardised features' gradient"),
    Mutation("fold-scores-without-offset", "heads/logistic_path.py", "        scores += offset.astype(np.float32)\n", "",
             ("tests/test_logistic_path.py", "-k", "folded_standardisation"),
             "the folded standardisation's scores are the standardised features' scores"),
    Mutation("line-slope-without-penalty", "heads/logistic_path.py",
             "return value, slope + objective.strength * (wd + step * dd)", "return value, slope",
             ("tests/test_logistic_path.py", "-k", "line_prices"), "a line's slope is the objective's"),
    Mutation("fold-far-from-zero", "heads/logistic.py", "FOLD_LIMIT = 30.0 ", "FOLD_LIMIT = 1e30 ",
             ("tests/test_logistic_path.py", "-k", "far_from_zero"),
             "features far from zero are standardised before float32 products"),
    Mutation("sweep-reuses-any-score", "heads/logistic.py",
             "if scored and torch.equal(scored[0], weight) and torch.equal(scored[1], bias):", "if scored:",
             ("tests/test_logistic_path.py", "-k", "scores_each_model"), "each model on the path is scored as itself"),
    # Predict, export and finetune reproduce the cached features.
    Mutation("predict-rounding", "serve/predict.py", "return values.to(getattr(torch, self.storage_dtype)).float()",
             "return values.float()", ("tests/test_fit.py", "-k", "cached_features"),
             "predict rounds features to the cache's storage dtype"),
    Mutation("predict-resize", "serve/predict.py", "return prepare_image(image, self.preprocessing)",
             'return prepare_image(image, __import__("dataclasses").replace('
             'self.preprocessing, interpolation="nearest"))',
             ("tests/test_fit.py", "-k", "cached_features"), "predict resizes images as extract did"),
    Mutation("predict-normalisation", "serve/predict.py", "x = normalize_batch(images, self.preprocessing)",
             'x = normalize_batch(images, __import__("dataclasses").replace(self.preprocessing, std=(0.25, 0.25, 0.25)))',
             ("tests/test_fit.py", "-k", "cached_features"), "predict normalises with the cache's mean and std"),
    Mutation("export-rounding", "serve/export.py", "if self.half:", "if False:",
             ("tests/test_fit.py", "-k", "exported_model"), "an exported model rounds features like the cache"),
    Mutation("finetune-rounding", "finetune/stage.py", "if not self.training and self.round_to is not None:",
             "if False:", ("tests/test_finetune.py", "-k", "epoch_zero"),
             "LP-FT epoch 0 is the starting head on float16 storage"),
    # A non-ResNet backbone runs through its feature description.
    Mutation("description-readout", "backbones/description.py", "            return self.readouts[tap](*(kept[s] for s in self._reads[tap]), x)\n",
             "            return x\n", ("tests/test_description.py", "-k", "directly"),
             "a tap read through a readout (e.g. a CLS token) is the readout's output"),
    Mutation("description-forward-from", "backbones/description.py",
             "x = self.run(x, self.tap_index(tap) + 1, self.tap_index(until) + 1)",
             "x = self.run(x, self.tap_index(tap), self.tap_index(until) + 1)",
             ("tests/test_description.py", "-k", "shapes_and_blocks"), "the rest of the network runs from a tap"),
    Mutation("fold-traced-pairs", "backbones/optimize.py", "found.append((source.target, node.target))", "pass",
             ("tests/test_description.py", "-k", "fold"), "BatchNorm folding finds conv/bn pairs in any traced block"),
    Mutation("finetune-input-tap", "finetune/stage.py", "self.input_tap = backbone.input_tap(self.start)",
             "self.input_tap = backbone.input_tap(self.start - 1)", ("tests/test_description.py", "-k", "finetune"),
             "the fast path starts from the tap at the input of the first unfrozen stage"),
    Mutation("export-stages", "backbones/description.py",
             "self.stages = nn.Sequential(*[staged.stage(name) for name in staged.stage_names[:stop]])",
             "self.stages = nn.Sequential(*[staged.stage(name) for name in staged.stage_names[1:stop]])",
             ("tests/test_description.py", "-k", "finetune"), "export runs the stages up to the tap"),
    # timm backbones.
    Mutation("timm-cls-token", "backbones/timm_family.py", "return x[:, 0]", "return x[:, 1]",
             ("tests/test_timm.py", "-k", "features_equal and vit"), "tap cls is a ViT's class token"),
    Mutation("timm-interpolation", "backbones/timm_family.py",
             'interpolation=str(config.get("interpolation") or "bilinear")', 'interpolation="bilinear"',
             ("tests/test_timm.py", "-k", "preprocessing and convnext and None"),
             "timm models are preprocessed with their data config's interpolation"),
    Mutation("key-crop-mode", "backbones/registry.py",
             '**({"crop_mode": self.crop_mode} if self.crop_mode is not None else {}),', "",
             ("tests/test_timm.py", "-k", "key_follows"), "timm's crop mode is recorded in the key"),
    # finetune --from-cache for timm ViTs: the token-sequence taps, the fast path from them.
    Mutation("vit-tokens-wrong-block", "backbones/timm_family.py", 'Tap(name=f"tokens{i}", stage=f"blocks.{i}"',
             'Tap(name=f"tokens{i}", stage=f"blocks.{max(i - 1, 0)}"', (VIT, "-k", "token_taps_equal"),
             "tap tokensK is block K's output"),
    Mutation("vit-tokens-no-prefix", "backbones/timm_family.py",
             'return int(getattr(network, "num_prefix_tokens", 1)) + int(rows) * int(columns), width',
             "return int(rows) * int(columns), width", (VIT, "-k", "token_taps"),
             "a token tap holds the class and register tokens too"),
    Mutation("vit-embed-no-norm-pre", "backbones/timm_family.py",
             "return net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))",
             "return net.patch_drop(net._pos_embed(net.patch_embed(x)))", (VIT, "-k", "norm_pre"),
             "a ViT's embedding ends with timm's norm_pre"),
    Mutation("vit-up-to-reads", "backbones/description.py",
             "self.keep = [staged.stage_index(s) for s in staged.description.tap(tap).reads]",
             "self.keep = [staged.stage_index(s) + 1 for s in staged.description.tap(tap).reads]",
             ("tests/test_timm_taps.py", "-k", "register"), "export's dinov2_linear reads the last four blocks"),
    Mutation("timm-units-skip-first", "backbones/timm_family.py",
             'units += [f"{name}.{i}" for i in range(len(getattr(network, name)))]',
             'units += [f"{name}.{i}" for i in range(1, len(getattr(network, name)))]',
             (VIT, "-k", "convnets and convnext"),
             "a timm ConvNet cut into units runs every unit of forward_features"),
    Mutation("timm-map-tap-next-unit", "backbones/timm_family.py",
             'maps = [Tap(name=u.replace(".", "_"), stage=f"{FEATURES}.{u}",',
             'maps = [Tap(name=u.replace(".", "_"), stage=f"{FEATURES}.{self.units[self.units.index(u) + 1]}",',
             (VIT, "-k", "convnets"), "a ConvNet's map tap is its own unit's output"),
    Mutation("finetune-image-path-short", "finetune/stage.py", "x = self.backbone.run(x, 0, self.start)",
             "x = self.backbone.run(x, 0, self.start - 1)", (VIT, "-k", "first_steps"),
             "the image path runs every frozen block (as the cached tap did)"),
    Mutation("finetune-start-block", "finetune/stage.py", "self.start = backbone.block_stage(trainable[0])",
             "self.start = backbone.block_stage(trainable[-1])", (VIT, "-k", "first_steps or only_the"),
             "the fast path starts at the first unfrozen block"),
    Mutation("finetune-trains-frozen", "finetune/stage.py", "backbone.get_submodule(name).requires_grad_(True)",
             "backbone.requires_grad_(True)", (VIT, "-k", "only_the"), "only the unfrozen blocks change"),
    Mutation("finetune-token-rows-layout", "finetune/data.py", "if x.ndim == 4:", "if True:",
             (VIT, "-k", "first_steps"), "cached token sequences (3-D rows) reach the model"),
    Mutation("finetune-missing-tap-unchecked", "finetune/stage.py",
             "if spec.from_cache and (tap is None or tap not in cache.tap_shapes):",
             "if spec.from_cache and tap is None:", (VIT, "-k", "missing"),
             "a missing tap is one error line naming it and the command that adds it"),
    Mutation("finetune-no-input-tap-unexplained", "finetune/stage.py",
             '    if tap is None:\n        return (f"--from-cache cannot unfreeze',
             '    if False:\n        return (f"--from-cache cannot unfreeze', (VIT, "-k", "other_timm"),
             "a backbone without a tap at the blocks' input is refused, saying why"),
    Mutation("pipeline-fast-path-last-block", "pipeline/runner.py", "staged.input_tap(staged.block_stage(blocks[0]))",
             "staged.input_tap(staged.block_stage(blocks[-1]))", (VIT, "-k", "pipeline"),
             "a pipeline names the tap a ViT's fast path needs"),
    # Streaming heads hold about one shard, not the split.
    Mutation("streaming-accumulates", "cache/streaming.py",
             'read_split_features([(cache.path / shard["file"], count, shard)], tap, shape, values)',
             'read_split_features([(cache.path / shard["file"], count, shard)], tap, shape, values); '
             'globals().setdefault("_kept", []).append(values)',
             ("tests/test_streaming.py", "-k", "bounded"), "streamed heads hold a bounded multiple of the budget"),
    # Hugging Face datasets: each row its own label and split, fingerprinted by its bytes.
    Mutation("hf-row-labels", "data/hf.py", "label = int(labels[split][i])", "label = int(labels[split][i - 1])",
             ("tests/test_hf_sources.py", "-k", "matches_the_image_folder or local_layout"),
             "each Hugging Face row gets its own label"),
    Mutation("hf-validation-split", "data/hf.py", "return SPLIT_WORDS.get(word, word) if word", "return word if word",
             ("tests/test_hf_sources.py", "-k", "matches_the_image_folder"), "Hugging Face's validation is our val"),
    Mutation("hf-content-fingerprint", "data/hf.py", "hashlib.sha256(data).hexdigest()", "'same'",
             ("tests/test_hf_sources.py", "-k", "content_fingerprints"), "a row's fingerprint follows its image bytes"),
    Mutation("hf-header-check", "data/hf.py", "with Image.open(io.BytesIO(data)):", "with contextlib.nullcontext():",
             ("tests/test_hf_sources.py", "-k", "mistake or undecodable"), "bytes that are no image are refused first"),
    Mutation("export-hf-dtype", "serve/export_features.py", "column = vector(datasets.Value(dtype), length=shape[0])",
             "column = vector(datasets.Value('float32'), length=shape[0])",
             ("tests/test_export_features.py", "-k", "hf"), "export-features --format hf keeps the cache's bits"),
    # Augmented views (issue 18).
    Mutation("views-key-seed", "cache/views.py", '"seed": seed,\n', '',
             ("tests/test_views.py::test_views_are_a_keyed_set_beside_the_plain_features",), "the view seed is in the view key"),
    Mutation("views-global-rng", "extract/views.py", "return np.random.default_rng([seed, digest, view])",
             "return np.random.default_rng()", ("tests/test_views.py", "-k", "depends_on or later or killed"),
             "a view depends on (seed, image, index) only"),
    Mutation("views-recompute-all", "extract/views.py", "if view_shard(view, block) not in listed]", "]",
             ("tests/test_views.py::test_more_views_later_compute_only_the_new_ones",), "more views compute only the new ones"),
    Mutation("views-unverified", "maintain/verify.py", "        _check_views(report, shapes, len(manifest[\"classes\"]))\n", "",
             ("tests/test_views.py::test_a_damaged_view_shard_is_found_by_verify_and_refused_on_read",), "verify checks view shards"),
    Mutation("views-val-rows", "fit/views.py", "bank = bank.reshape(len(bank), count, -1)[train_rows]",
             "bank = bank.reshape(len(bank), count, -1)[:len(train_rows)]",
             ("tests/test_views.py::test_views_of_validation_rows_never_reach_training",), "views of validation rows never train"),
    Mutation("views-mlp-plain-only", "heads/mlp.py", "if views is not None:  # one version", "if False:  # one version",
             ("tests/test_views.py::test_mlp_draws_one_version_per_image_per_epoch",), "the MLP trains on the views"),
    Mutation("views-logistic-ignored", "fit/views.py", "    if bank is None:\n", "    if True:\n",
             ("tests/test_views.py", "-k", "logistic"), "logistic trains on the stacked views"),
    Mutation("views-noise-off", "heads/mlp.py", "        if self.feature_noise:\n", "        if False:\n",
             ("tests/test_views.py::test_feature_space_augmentation_changes_the_mlp",), "feature_noise changes the MLP"),
    # Ensembles across entries (fit/cross_ensemble.py): rows matched by path, staleness, refusals.
    Mutation("cross-by-position", "fit/cross_ensemble.py",
             "rows = np.fromiter((where[path] for path in common), np.int64, len(common))",
             "rows = np.arange(len(common))", (CROSS, "-k", "matched_by_path and weighted"),
             "entries' rows are matched by path, not by position"),
    Mutation("cross-equal-weights", "fit/cross_ensemble.py", "total += weight * probabilities[rows]",
             "total += probabilities[rows] / len(parts)", (CROSS, "-k", "weighted_mean"), "the vote follows its weights"),
    Mutation("cross-left-out-unrecorded", "fit/cross_ensemble.py", '"left_out": len(self.missing_from)', '"left_out": 0',
             (CROSS, "-k", "matched_by_path and weighted"), "rows left out of the vote are counted"),
    Mutation("cross-carved-train-rows", "fit/stage.py",
             'validation["fraction"], validation["seed"])[1]', 'validation["fraction"], validation["seed"])[0]',
             (CROSS, "-k", "carved"), "a vote is scored on its members' carved validation rows, not training rows"),
    Mutation("cross-labels-unchecked", "fit/cross_ensemble.py", "elif (member_labels[rows] != labels).any():",
             "elif False:", (CROSS, "-k", "cannot_be_matched"), "a path labelled differently by two entries is refused"),
    Mutation("cross-duplicate-paths", "fit/cross_ensemble.py", "            if path in where:\n", "            if False:\n",
             (CROSS, "-k", "cannot_be_matched"), "a path listed twice in one entry is refused"),
    Mutation("cross-any-source", "fit/cross_ensemble.py", "if mine != theirs:", "if False:", (CROSS, "-k", "refused"),
             "entries of another source are refused"),
    Mutation("cross-any-classes", "fit/cross_ensemble.py", "if other.classes != home.classes:", "if False:",
             (CROSS, "-k", "refused"), "entries with other classes are refused"),
    Mutation("cross-refit-unseen", "fit/headstore.py", 'if current != member["checksum"]:', "if False:",
             (CROSS, "-k", "stale"), "a member fitted again makes the vote stale"),
    Mutation("cross-reextract-unseen", "fit/headstore.py", 'if other.key != member["cache_key"]:', "if False:",
             (CROSS, "-k", "stale"), "a member's entry extracted again makes the vote stale"),
    Mutation("cross-on-one-entry", "fit/headstore.py", "    if record[\"head\"] == CROSS_ENSEMBLE:\n        entries",
             "    if False:\n        entries", (CROSS, "-k", "not_applied"),
             "a vote across entries is never applied to one entry's features"),
    Mutation("cross-one-preprocessing", "serve/predict.py", "tuple(member.prepare(image) for member in self.members)",
             "tuple(self.members[0].prepare(image) for member in self.members)", (CROSS, "-k", "predict_on_images"),
             "predict runs each member's backbone with its own preprocessing"),
    Mutation("cross-split-rows-hidden", "serve/predict.py", "for path in home + [p for p in voted.missing_from if p not in listed]:",
             "for path in voted.paths:", (CROSS, "-k", "predict_split"), "predict --split names the rows left out"),
    Mutation("cross-export-accepted", "serve/export.py", "if isinstance(predictor, CrossPredictor):", "if False:",
             (CROSS, "-k", "cli"), "export refuses a vote across entries in one line"),
    Mutation("cross-report-inputs", "report/page.py", "            parts.append(f\"{name}:{cross_member_changes(cache, record)}\")\n",
             "            pass\n", (CROSS, "-k", "report"), "the report is rebuilt when a vote turns stale through another entry"),
    Mutation("cross-entry-dots", "cache/schema.py", 'if self.entry in (".", ".."):', "if False:", (CROSS, "-k", "schema"),
             "a recorded member entry cannot name the parent folder"),
    # Heads through the library: features with NaN or inf are refused, not fitted or scored as class 0.
    Mutation("head-non-finite-accepted", "heads/base.py", "    check_finite(X, name)\n", "",
             ("tests/test_heads.py", "-k", "non_finite"), "heads refuse NaN or inf features, naming the rows"),
    Mutation("head-finite-before-float32", "heads/base.py",
             "    X = np.ascontiguousarray(X, dtype=np.float32)\n    check_finite(X, name)\n",
             "    check_finite(np.asarray(X), name)\n    X = np.ascontiguousarray(X, dtype=np.float32)\n",
             ("tests/test_heads.py", "-k", "non_finite"), "values that overflow float32 are refused as inf"),
    Mutation("bias-drift", "heads/logistic_path.py", "            self.bias -= self.bias.max()\n", "",
             ("tests/test_logistic_path.py", "-k", "drift"), "the biases cannot drift together at a tight tol"),
    Mutation("unconverged-silent", "heads/logistic_path.py", "    if largest <= tol:\n        return\n",
             "    return\n", ("tests/test_logistic_path.py", "-k", "says_so"), "a solve stopped above tol is a warning"),
    Mutation("loss-underflow", "heads/logistic_path.py", "    if bool(small.any()):\n", "    if False:\n",
             ("tests/test_logistic_path.py", "-k", "float32_cannot"),
             "a true class whose float32 probability underflows still counts in the loss"),
    Mutation("bias-chord-unscaled", "heads/logistic_path.py", "            mean = growth * (probabilities /",
             "            mean = (probabilities /", ("tests/test_logistic_path.py", "-k", "without_softmax"),
             "the bias solve's Newton steps price a bias change without a softmax pass"),
    Mutation("bias-no-rebase", "heads/logistic_path.py", "            if np.ptp(change) > self.REBASE:",
             "            if False:", ("tests/test_logistic_path.py", "-k", "without_softmax"),
             "a bias change spread beyond REBASE is priced by a softmax pass"),
    Mutation("solver-threads-kept", "heads/logistic_path.py",
             "    try:\n        yield\n    finally:\n        torch.set_num_threads(threads)\n",
             "    yield\n    torch.set_num_threads(threads)\n", ("tests/test_logistic_path.py", "-k", "one_thread"),
             "the CPU solver gives torch its threads back, also when it raises"),
    Mutation("validation-fold-offset", "heads/logistic_path.py", "biases = np.stack([bias + offset for",
             "biases = np.stack([bias + 0 * offset for", ("tests/test_logistic_path.py", "-k", "validation_scores"),
             "validation scores raw features with the standardisation folded in"),
    Mutation("verify-unreadable-manifest-advice", "cli/verify_commands.py",
             "    elif not report.manifest_readable:", "    elif False:",
             ("tests/test_verify.py", "-k", "unreadable_manifest"),
             "verify on an unreadable manifest says to extract again, not to run verify --repair"),
    Mutation("predict-missing-exits-0", "cli/fit_commands.py", "    if failed:  # a script", "    if False:  # a script",
             ("tests/test_fit.py", "-k", "exits_1_when"),
             "predict exits 1 with a warning when an image has no prediction"),
    Mutation("heads-stop-at-damage", "fit/headstore.py", "        except CorruptCacheError as error:",
             "        except ZeroDivisionError as error:", ("tests/test_hostile_cache.py", "-k", "damaged_head"),
             "heads and the report list the other heads when one head's record is damaged, and mark it"),
    Mutation("report-damage-unsaid", "report/page.py", "    result.notes += [", "    [",
             ("tests/test_hostile_cache.py", "-k", "report_marks"),
             "the report command warns and exits 1 when it left a damaged head out"),
    Mutation("info-complete-when-damaged", "cache/summary.py",
             'return f"damaged: shard {problem[0]} {problem[1]} (run featurecache verify --repair)"',
             'return "complete"', ("tests/test_verify.py", "-k", "damage_is_reported"),
             "info and ls say damaged, not complete, when a listed shard is missing or resized"),
    Mutation("pipeline-weights-unchecked", "pipeline/runner.py", "        if not candidate.is_file():",
             "        if False:", ("tests/test_pipeline.py", "-k", "errors_name"),
             "run --check refuses a weights file that is not there"),
    Mutation("pipeline-root-file-accepted", "pipeline/runner.py",
             "    if blocker is not None:", "    if False:",
             ("tests/test_pipeline.py", "-k", "errors_name or check_validates"),
             "run --check refuses a cache root that is a file or under one"),
    Mutation("cli-markup-on", "cli/app.py", "console = Console(markup=False, highlight=False)", "console = Console()",
             ("tests/test_cli.py", "-k", "markup"), "class names, paths and tap labels print as they are, not as markup"),
    Mutation("heads-skip-headless", "fit/headstore.py", " for name in _headless(cache)]", " for name in []]",
             ("tests/test_hostile_cache.py", "-k", "file_is_gone"),
             "heads lists a head whose file is gone (head.json left) as damaged"),
    Mutation("sweep-same-model-unsaid", "heads/logistic.py",
             "scores[index], same[index] = scored[2], scored[3]", "scores[index] = scored[2]",
             ("tests/test_logistic_path.py", "-k", "scores_each_model"),
             "a C whose path did not move is recorded as keeping the previous C's model"),
    Mutation("knn-module-zero-rows", "heads/knn.py",
             'return torch.where(no_direction, torch.full_like(probabilities, float("nan")), probabilities)',
             "return probabilities", ("tests/test_heads.py", "-k", "without_a_direction"),
             "an exported or predicting k-NN module marks a query row with no direction NaN, not a class"),
    Mutation("head-classes-unchecked", "fit/headstore.py",
             'if list(record["classes"]) != list(cache.classes):  # same count', "if False:  # same count",
             ("tests/test_fit.py", "-k", "class_names_changed"),
             "a head refuses a cache whose class names or order changed since it was fitted"),
    Mutation("paths-unchecked", "cache/shards.py",
             'if expected is not None and "xxh3_64:" + xxhash.xxh3_64(_paths_bytes(values)).hexdigest() != expected:',
             "if False:", ("tests/test_hostile_cache.py", "-k", "paths_is_refused"),
             "a shard's paths are checked against their checksum on every read"),
    Mutation("repair-seals-edited-classes", "maintain/verify.py", "        _refuse_edited_settings(path, manifest)\n",
             "", ("tests/test_hostile_cache.py", "-k", "valid_values or no_longer_give"),
             "verify --repair does not seal a manifest whose classes or config were edited"),
    Mutation("head-json-unchecked", "maintain/verify.py", "            _check_head_copy(report, directory, record)\n",
             "", ("tests/test_hostile_cache.py", "-k", "edited_head_json"),
             "verify reports an edited head.json and --repair writes it again"),
    Mutation("standardise-float32-overflow", "heads/base.py", "        moments = _moments(X, np.float64)\n",
             "        pass\n", ("tests/test_logistic_path.py", "-k", "overflow"),
             "features whose squares overflow float32 are standardised in float64"),
    Mutation("knn-search-k-alone", "heads/knn.py",
             '        return max(self.best_params_["k"], getattr(self, "search_k_", None) or 0)\n',
             '        return self.best_params_["k"]\n', ("tests/test_heads.py", "-k", "neighbours_tie"),
             "a knn head predicts what its k was chosen by, also when neighbours tie"),
    Mutation("knn-zero-rows", "heads/knn.py", "    if len(short):\n", "    if False:\n",
             ("tests/test_heads.py", "-k", "without_a_direction"), "knn refuses all-zero rows (no cosine)"),
    Mutation("predict-nan-ranked", "serve/predict.py", "    if not np.isfinite(row).all():", "    if False:",
             ("tests/test_fit.py", "-k", "predict_reports"), "predict gives no class for an image scored NaN"),
    Mutation("predict-any-row-ranked", "serve/predict.py", "    if row.min() < 0 or abs(total - 1.0) > DISTRIBUTION_TOL:",
             "    if False:", ("tests/test_fit.py", "-k", "predict_reports"),
             "predict gives no class for probabilities that are not a distribution"),
    # Data read right: listings that contradict themselves are refused, classes left untaught are said.
    Mutation("csv-repeated-file", "data/csv_source.py", "        _refuse_repeated_files(csv_path, base, rows)\n", "",
             ("tests/test_layout.py", "-k", "twice"), "a CSV listing one image twice is refused"),
    Mutation("csv-repeated-unnormalised", "data/csv_source.py",
             "where = os.path.normpath(path if os.path.isabs(path) else base / path)",
             "where = str(path if os.path.isabs(path) else base / path)",
             ("tests/test_layout.py", "-k", "twice"), "./a.png and a.png are one file"),
    Mutation("label-twins", "data/layout_checks.py", "        if twin != name:", "        if False:",
             ("tests/test_layout.py", "-k", "two_ways"), "labels spelt two ways are refused"),
    Mutation("twin-numbers", "data/layout_checks.py", "        value = float(name)", "        value = float('x' + name)",
             ("tests/test_layout.py", "-k", "two_ways"), "1 and 1.0 are one label"),
    Mutation("csv-unknown-split", "data/csv_source.py", "if label and split not in SPLIT_ORDER and not allow_layout:",
             "if False:", ("tests/test_layout.py", "-k", "unknown_split"), "labelled rows in a misspelt split are refused"),
    Mutation("untaught-classes", "cache/coverage.py", "    missing = np.flatnonzero(counts[\"train\"] == 0)",
             "    missing = np.flatnonzero(counts[\"train\"] < 0)",
             ("tests/test_layout.py", "-k", "all_skipped"), "a class with no train row is warned about"),
    Mutation("repair-seals-edited-spec", "maintain/verify.py", "    _refuse_edited_spec(path, manifest)\n", "",
             ("tests/test_hostile_cache.py", "-k", "spec_that"), "repair does not seal a spec naming another source"),
    # A finetune run is used only as what it is: finished, or said to be unfinished; resumed only as started.
    Mutation("finetune-unfinished-exported", "finetune/runs.py", "if warning and not unfinished_ok:", "if False:",
             (FINETUNE, "-k", "unfinished_run"), "an unfinished run is refused (export, the library)"),
    Mutation("finetune-unfinished-export-allowed", "cli/fit_commands.py", "unfinished_ok=warnings is not None",
             "unfinished_ok=True", (FINETUNE, "-k", "unfinished_run"), "export refuses an unfinished run"),
    Mutation("finetune-unfinished-predict-silent", "cli/fit_commands.py",
             "        if warning and warnings is not None:\n            warnings.append(warning)", "        pass",
             (FINETUNE, "-k", "unfinished_run"), "predict with an unfinished run warns and exits 1"),
    Mutation("finetune-runs-listed-by-file", "finetune/runs.py", "sorted(p.parent.name for p", "sorted(p.name for p",
             (FINETUNE, "-k", "missing_run"), "an unknown run's error lists the run names"),
    Mutation("finetune-recordless-folder-unknown", "finetune/runs.py", "        if directory.is_dir():",
             "        if False:", (FINETUNE, "-k", "missing_run"), "a run folder without a record is unfinished"),
    Mutation("finetune-weights-epoch-unchecked", "finetune/runs.py",
             'if set(epochs.values()) != {record.get("best_epoch")}:', "if False:", (FINETUNE, "-k", "another_epoch"),
             "weights of another epoch than the record's best are refused"),
    Mutation("finetune-restart-keeps-record", "finetune/stage.py",
             "for old in (directory / FINETUNE_RECORD, checkpoint):", "for old in (checkpoint,):",
             (FINETUNE, "-k", "restarted"), "a restart removes the old record before writing new weights"),
    Mutation("finetune-restart-keeps-checkpoint", "finetune/stage.py",
             "for old in (directory / FINETUNE_RECORD, checkpoint):", "for old in (directory / FINETUNE_RECORD,):",
             (FINETUNE, "-k", "restarted"), "a restart removes the old checkpoint before writing new weights"),
    Mutation("finetune-no-epoch-zero-record", "finetune/stage.py",
             '{"epoch": 0, **_small(record)})\n        write_json_atomic(', '{"epoch": 0, **_small(record)})\n        (',
             (FINETUNE, "-k", "restarted"), "a run's record follows its epoch-0 weights"),
    Mutation("finetune-resume-name-compared", "finetune/spec.py", '"device", "name")', '"device")',
             (FINETUNE, "-k", "resume_with_other"), "--name of the default folder resumes it"),
    Mutation("finetune-resume-head-unresolved", "finetune/stage.py", '"head": head_name, HEAD_FIT', "HEAD_FIT",
             (FINETUNE, "-k", "resume_with_other"), "--head naming the default head resumes the run"),
    Mutation("finetune-resume-head-fit-ignored", "finetune/stage.py",
             ", HEAD_FIT: read_record_with_checksum(cache, head_name)[1]}", "}", (FINETUNE, "-k", "resume_with_other"),
             "a run does not resume from a starting head fitted again"),
    Mutation("finetune-resume-older-checkpoint", "finetune/spec.py", "    if HEAD_FIT not in saved:", "    if False:",
             (FINETUNE, "-k", "record_its_head_fit"), "a checkpoint without its head's fit asks for --restart only"),
    Mutation("finetune-from-cache-augmentation-compared", "finetune/spec.py",
             '(_AUGMENTATION if settings.get("from_cache") else ())', "()", (FINETUNE, "-k", "interrupted_run"),
             "--from-cache resumes over augmentation settings it never uses"),
    # -o refuses what it would break (report, compare, export, export-features, predict, pipelines).
    Mutation("output-inside-entry-allowed", "cache/integrity.py", "        if _entry_folder(folder):", "        if False:",
             ("tests/test_fit.py", "-k", "refuse_an_output_path"), "no -o inside a cache entry"),
    Mutation("output-dash-allowed", "cache/integrity.py", '    if str(output) == "-":', "    if False:",
             ("tests/test_fit.py", "-k", "refuse_an_output_path"), "-o - is refused"),
    Mutation("output-link-to-folder-unresolved", "cache/integrity.py",
             "output.resolve() if output.is_dir() else output.parent.resolve() / output.name",
             "output.parent.resolve() / output.name", ("tests/test_export_features.py", "-k", "break"),
             "a link to a folder inside an entry is refused"),
    Mutation("page-figures-overwritten", "report/page.py", "    taken = None if overwrite else",
             "    taken = None if True else", ("tests/test_report.py", "-k", "replaces_a_file"),
             "report -o replaces a file only with --overwrite"),
    Mutation("pipeline-report-replaces-any-file", "pipeline/runner.py",
             "    if Path(output).is_file() and not is_report_page(Path(output)):", "    if False:",
             ("tests/test_pipeline.py", "-k", "own_page"), "a pipeline replaces only its own page"),
    Mutation("report-hash-overwrite", "report/page.py", '    del shown["overwrite"]', "    pass",
             ("tests/test_pipeline.py", "-k", "own_page"), "an unchanged report step stays cached"),
    Mutation("export-features-repeated-split", "serve/export_features.py", "        if split in chosen[:i]:",
             "        if False:", ("tests/test_export_features.py", "-k", "repeated"), "a repeated --split is refused"),
    Mutation("export-features-leaves-partial", "serve/export_features.py",
             "            shutil.rmtree(output, ignore_errors=True)", "            pass",
             ("tests/test_export_features.py", "-k", "failed"), "a failed export leaves nothing"),
    Mutation("split-alias-last-wins", "data/sources.py", "                if split in split_dirs:", "                if False:",
             ("tests/test_layout.py", "-k", "one_split"), "val/ and validation/ together are refused"),
    Mutation("beside-splits-unread", "data/layout_checks.py", "    if unread:\n", "    if False:\n",
             ("tests/test_layout.py", "-k", "beside_the_split"), "folders beside the split folders are not dropped"),
    Mutation("beside-splits-loose", "data/layout_checks.py", "    if loose:\n        raise SourceError(f\"{root}: {loose}",
             "    if False:\n        raise SourceError(f\"{root}: {loose}", ("tests/test_layout.py", "-k", "beside_the_split"),
             "images beside the split folders are not dropped"),
    Mutation("twin-unicode", "data/layout_checks.py", 'text = unicodedata.normalize("NFC", name).strip()',
             "text = name", ("tests/test_layout.py", "-k", "two_ways"), "cafe in NFC and NFD are one class"),
    Mutation("tiny-val-repeated", "data/named.py", "        if fields[0] in annotated:", "        if False:",
             ("tests/test_named_sources.py", "-k", "listed_twice"), "a Tiny-ImageNet val image listed twice is refused"),
    Mutation("array-label-range", "data/sources.py", "        if outside.size:", "        if False:",
             ("tests/test_layout.py", "-k", "beyond_the_class"), "a label beyond the class names is an error"),
    Mutation("class-depth-unchecked", "data/layout_checks.py", "    if depths and not any(depths.values()):",
             "    if False:", ("tests/test_layout.py", "-k", "only_subfolders"),
             "class folders holding only subfolders are refused"),
    Mutation("sun397-layout-unknown", "data/layout_checks.py", '        if (base / "ClassName.txt").is_file():',
             "        if False:", ("tests/test_layout.py", "-k", "only_subfolders"), "SUN397's folder suggests sun397:"),
    Mutation("split-own-class-names", "data/python_objects.py",
             "remapped[split] = [label if label is None or label < 0 else index[names[label]] for label in labels[split]]",
             "remapped[split] = labels[split]",
             ("tests/test_python_sources.py::test_a_split_lacking_a_class_keeps_each_image_its_own_class",
              "tests/test_torchvision_sources.py::test_dtd_split_whose_label_file_lacks_a_class_keeps_each_image_its_class"),
             "each split's labels are read through its own class names"),
    Mutation("hf-relative-paths", "data/hf.py", '            if self.kind == "hf" and not Path(file).is_absolute():',
             "            if False:", ("tests/test_hf_sources.py", "-k", "relative"),
             "relative image paths of an hf: folder are refused"),
    Mutation("csv-empty-split-is-train", "data/csv_source.py", '                if not given and "split" in header:',
             "                if False:", ("tests/test_layout.py", "-k", "unknown_split"),
             "an empty split cell is refused, not read as train"),
    Mutation("same-file-twice", "data/layout_checks.py", "        if first != relpath:", "        if False:",
             ("tests/test_layout.py", "-k", "reached_twice"), "one file reached twice (a link) is refused"),
    Mutation("hidden-folder-class", "data/python_objects.py", "        if hidden:  # torchvision", "        if False:  # torchvision",
             ("tests/test_torchvision_sources.py", "-k", "hidden"), "a hidden folder is not a class"),
    Mutation("unlabeled-drops-labels", "data/layout_checks.py", "    if len(holding) > 1:", "    if False:",
             ("tests/test_layout.py", "-k", "unlabeled_on"), "--unlabeled on a split of class folders is refused"),
    Mutation("merge-names-appends", "data/python_objects.py",
             "merged.insert(max(before) + 1 if before else len(merged) if k else 0, c)", "merged.append(c)",
             ("tests/test_python_sources.py", "-k", "unsorted_orders"),
             "splits with their own unsorted class orders keep each order, a new name after its predecessor"),
    Mutation("member-damage-as-stale", "fit/headstore.py", "            if damage_raises:\n                raise",
             "            if False:\n                raise", ("tests/test_hostile_cache.py", "-k", "damaged_head"),
             "an ensemble names a damaged member as damaged (refit it), not as changed since"),
]


def apply(copy: Path, mutation: Mutation) -> str:
    """Write the mutated module into the copy; return the original text to restore."""
    path = copy / "featurecache" / mutation.module
    text = path.read_text()
    count = text.count(mutation.original)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name}: the snippet occurs {count} times in "
                         f"featurecache/{mutation.module}; update tests/mutate.py")
    path.write_text(text.replace(mutation.original, mutation.mutated))
    return text


def run(copy: Path, mutation: Mutation, timeout: float) -> tuple[str, float]:
    original = apply(copy, mutation)
    started = time.perf_counter()
    environment = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests],
                              cwd=copy, env=environment, capture_output=True, text=True, timeout=timeout)
        # 1: tests failed (caught); 0: passed (survived); 5: no test selected, 2-4: a broken run.
        outcome = {0: "SURVIVED", 1: "caught"}.get(done.returncode, f"error (pytest exit {done.returncode})")
        if done.returncode == 0 and " passed" not in (done.stdout.strip().splitlines() or [""])[-1]:
            outcome = "error (every test skipped)"  # nothing was checked: neither caught nor survived
        if done.returncode not in (0, 1):
            print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
    except subprocess.TimeoutExpired:
        outcome = "caught (timed out)"
    finally:
        (copy / "featurecache" / mutation.module).write_text(original)
    return outcome, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation")
    args = parser.parse_args()
    known = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:28} featurecache/{m.module:18} {m.breaks}")
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}; see --list")
    selected = [known[n] for n in args.names] if args.names else MUTATIONS
    with tempfile.TemporaryDirectory(prefix="featurecache-mutate-") as scratch:
        copy = Path(scratch) / "repository"
        shutil.copytree(REPOSITORY, copy, ignore=IGNORED)
        if (REPOSITORY.parent / "shared").is_dir():  # ../shared beside the copy too: tests that use its photos run
            (Path(scratch) / "shared").symlink_to(REPOSITORY.parent / "shared")
        for m in selected:  # check every snippet before spending minutes on the first
            apply(copy, m)
            shutil.copy2(REPOSITORY / "featurecache" / m.module, copy / "featurecache" / m.module)
        results = []
        for m in selected:
            outcome, seconds = run(copy, m, args.timeout)
            results.append((m, outcome))
            print(f"{m.name:28} {outcome:22} {seconds:6.1f}s  {m.breaks}", flush=True)
    caught = sum(outcome.startswith("caught") for _, outcome in results)
    print(f"\n{caught} of {len(results)} mutations caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
