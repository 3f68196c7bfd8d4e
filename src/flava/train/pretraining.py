"""Stages `joint`, `text-mlm` and `image-mim`: the FLAVA model and its heads (`PretrainingModel`)
trained by the objectives of the data kind each step draws.

What is theirs: the model (fresh, from `init`, with encoders from `init_image` / `init_text` /
`init_multimodal`; the text encoder's settings and the tokenizer follow `init_text`), the codebook
check of prepared shards, DDP with unused parameters (a step trains one data kind) or FSDP by
blocks, the slower rate of initialised encoders, the tokenizer its checkpoints carry, and the
contrastive logit scale's clamp after each update.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import to_dict
from ..data.decode import DECODED
from ..data.processor import Processor
from ..data.samples import SampleMaker, SampleSpec
from ..data.shards import is_remote
from ..distributed import data_parallel, world
from ..errors import CheckpointError, ConfigError
from ..interop.text_towers import following
from ..loading import (Checkpoint, codebook_of, codebook_scale_note, load_codebook, pretraining_from_checkpoint,
                       read_checkpoint)
from ..model.layers import Block
from ..objectives.chunks import plan_chunks
from ..objectives.pretraining import PretrainingModel
from ..objectives.registry import active, needs_image_tokens
from ..typed import differences
from .stage import Stage, StageOutput


def _whole_model(init: str, asked, built) -> str:
    """What init= did: the checkpoint's model replaces the config's (a preset's or a file's) whole,
    settings included; the encoders' settings first, the codebook's last."""
    changed = sorted(differences(to_dict(asked), to_dict(built)).items(), key=lambda kv: kv[0].startswith("codebook."))
    shaped = [f"{k} {now}" + (f" (the config's {was})" if was is not None else "") for k, (was, now) in changed]
    more = f" and {len(shaped) - 6} more" if len(shaped) > 6 else ""
    return f"the whole model from init={init}" + ("; its settings, not the config's: " + ", ".join(shaped[:6]) + more
                                                  if shaped else "")


class PretrainingStage(Stage):
    """The joint stage and the unimodal ones: which encoders train follows from the data kinds."""

    name = "pretraining"

    def trained_kinds(self) -> set[str]:
        return {r.kind for r in active(self.cfg.objectives)}

    def sample_maker(self):
        cfg = self.cfg
        spec = SampleSpec.for_model(cfg.model, cfg.objectives, cfg.data.max_text_length, cfg.data.crop_scale_min,
                                    self.tokenizer)
        if needs_image_tokens(cfg.objectives, self.trained_kinds()):
            spec.image_vocab_size = cfg.model.image.vocab_size
        maker = SampleMaker(spec, cfg.seed)
        # Checked once here: on a GPU the text encoder does not read each batch's ids to check them.
        vocab = maker.tokenizer.vocab_size
        if self.trained_kinds() & {"pairs", "text"} and vocab > cfg.model.text.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab} tokens but the text encoder only "
                              f"model.text.vocab_size={cfg.model.text.vocab_size}; set model.text.vocab_size={vocab}")
        return maker

    def build(self, own: Checkpoint | None = None) -> dict[str, str]:
        cfg = self.cfg
        # Read only where image tokens are: a text or contrastive stage trains without it (an ablation's
        # shared codebook may not be trained yet when such a row runs).
        wanted = cfg.codebook and needs_image_tokens(cfg.objectives, set(self.kinds()) & self.trained_kinds())
        if own is not None:
            return self._rebuild(own, wanted)
        from .init import checkpoint_tokenizer, resolve_source, text_source

        try:
            codebook = load_codebook(cfg.codebook) if wanted else None
        except CheckpointError as e:  # the setting named, as find_sources names init's
            raise CheckpointError(f"codebook={cfg.codebook}: {e}") from None

        base = read_checkpoint(resolve_source(cfg.init)) if cfg.init else None
        asked = cfg.model
        model_cfg = base.config if base is not None else cfg.model
        self.tokenizer: str | None = checkpoint_tokenizer(base.path) if base is not None else None
        followed = ""
        self.initialised: dict[str, str] = {}
        if cfg.init_text:
            source = text_source(cfg.init_text)
            text = following(model_cfg.text, source.config)
            if text != model_cfg.text:
                changed = [k for k, v in to_dict(text).items() if to_dict(model_cfg.text)[k] != v]
                if base is not None:
                    raise ConfigError(
                        f"init_text={cfg.init_text} has another text encoder ({', '.join(changed)}) than init="
                        f"{cfg.init}; start without init, taking that model's other encoders with init_image="
                        f"{cfg.init} and init_multimodal={cfg.init}")
                model_cfg = dataclasses.replace(model_cfg, text=text)
                followed = "; model.text follows it (" + ", ".join(f"{k} {getattr(text, k)}" for k in changed) + ")"
            self.tokenizer = source.tokenizer
        if base is None and cfg.init_image:  # a public image tower decides the image encoder: build it so once
            from .init import follow_image_tower

            model_cfg = follow_image_tower(model_cfg, cfg.init_image, cfg.init_image_size)
        cfg.model = model_cfg  # the data pipeline and the saved settings must match the model built
        if base is not None:
            self.model, _ = pretraining_from_checkpoint(base, cfg.objectives, codebook)
        else:
            if codebook is not None and codebook.cfg.vocab_size < model_cfg.image.vocab_size:
                # A new model's heads can be sized to the codebook: classes no token names waste them.
                raise ConfigError(
                    f"the image codebook has {codebook.cfg.vocab_size} tokens but the MIM/MMM heads would predict "
                    f"image.vocab_size={model_cfg.image.vocab_size}; set model.image.vocab_size="
                    f"{codebook.cfg.vocab_size} (or use a codebook of {model_cfg.image.vocab_size} tokens)")
            self.model = PretrainingModel(model_cfg, cfg.objectives, codebook=codebook)
        if cfg.init_image or cfg.init_text or cfg.init_multimodal:
            from .init import initialise_encoders

            self.initialised = initialise_encoders(self.model, image=cfg.init_image, text=cfg.init_text,
                                                   multimodal=cfg.init_multimodal, image_size=cfg.init_image_size)
            if followed:
                self.initialised["text"] += followed
        cfg.model = self.model.config  # the data pipeline must match the model (a checkpoint's, a tower's)
        if codebook is not None:
            self._check_codebook_scale(codebook.trained_size)
            own, named = to_dict(codebook.cfg), to_dict(asked.codebook)
            if differ := [k for k in own if own[k] != named.get(k)]:  # --set model.codebook.* beside it is unused
                ours, theirs = (", ".join(f"{k} {d[k]}" for k in differ) for d in (own, named))
                self.initialised["codebook settings"] = (f"note: codebook={cfg.codebook} keeps its own settings "
                                                         f"({ours}): model.codebook's ({theirs}) do not apply to it")
        if base is not None:
            self.initialised = {"model": _whole_model(cfg.init, asked, cfg.model), **self.initialised}
        self.model.model.processor = Processor.from_config(self.model.config, self.tokenizer)
        return self.initialised

    def _rebuild(self, own: Checkpoint, wanted: bool) -> dict[str, str]:
        """The model of a run resumed from its checkpoint `own`, as the run's start built it, from
        the run's settings and what `own` holds: none of the sources it started from is read."""
        from .init import GROUPS, checkpoint_tokenizer

        cfg = self.cfg
        # Its checkpoints hold the codebook it trains with (any init= one included); those written
        # before they recorded the codebook's own settings beside a config of others cannot
        # describe it: it is read from where the run found it.
        try:
            codebook = codebook_of(own)
        except CheckpointError:
            codebook = None
        if codebook is None and cfg.codebook and (wanted or own.parts.get("codebook")):
            codebook = load_codebook(cfg.codebook)
        if cfg.init:  # init= decides the model, as at the start (model.* of --config or --override too)
            cfg.model = own.config
        self.tokenizer = checkpoint_tokenizer(own.path)
        self.model = PretrainingModel(cfg.model, cfg.objectives, codebook=codebook)
        self.model.model.processor = Processor.from_config(cfg.model, self.tokenizer)
        # The encoders init_* gave keep their own rate (`optimized`), as at the run's start.
        self.initialised = {name: f"the {name} encoder of init_{name}={getattr(cfg, f'init_{name}')}"
                            for name in GROUPS if getattr(cfg, f"init_{name}")}
        return self.initialised

    def _check_codebook_scale(self, trained: int | None) -> None:
        """A codebook reads any image size (it is convolutional), but one trained at another size
        than the model's grid asks of it makes tokens of another scale: said, not refused."""
        note = codebook_scale_note(self.cfg.codebook, trained, self.cfg.model, "this model's")
        if note:
            self.initialised["codebook"] = note

    def write_files(self, directory) -> None:
        self.model.model.save_tokenizer(directory)

    def open_data(self, streams: dict, world: int) -> list[str]:
        """Prepared shards carry image-token ids from one codebook: the run's must be that one
        (or none, when every source that needs targets is prepared), and every source's the same."""
        codebook, cfg = self.model.codebook, self.cfg
        notes = []
        made: dict[str, list[str]] = {}  # codebook fingerprint -> the sources whose MIM/MMM targets it made
        for kind, stream in streams.items():
            for s in stream.streams:
                info = s.source.prepared
                if s.source.prepared_apart:
                    raise ConfigError(f"{s.source.name} names shards prepared otherwise ("
                                      f"{'; '.join(s.source.prepared_apart[:2])}): name each folder as a source "
                                      "of its own")
                if info is None:
                    if codebook is None and needs_image_tokens(cfg.objectives, (kind,)):
                        # Remote shards named by a range or a glob are not looked up for a prepared folder's index.
                        remote = any(is_remote(str(getattr(shard, "url", ""))) for shard in s.source.shards)
                        said = (" is not known to hold image tokens (remote shards are read as prepared through their "
                                "folder's index.json: name that URL if they are `flava prepare`'s)") if remote else \
                            " has none precomputed"
                        raise ConfigError(
                            f"MIM/MMM need image tokens, but the {kind} data {s.source.name}{said} and "
                            "no codebook is given: train one with `flava train-codebook --images ... --output CB` and "
                            "pass --set codebook=CB, make the shards with `flava prepare --codebook CB`, or set "
                            "objectives.mim_weight=0 and objectives.mmm_image_weight=0")
                    continue
                if codebook is not None and info.get("codebook") != codebook.fingerprint():
                    raise ConfigError(
                        f"{s.source.name} holds image tokens of another codebook ({info.get('codebook')}) than "
                        f"{cfg.codebook} ({codebook.fingerprint()}): train with that codebook or none")
                if needs_image_tokens(cfg.objectives, (kind,)):
                    made.setdefault(info.get("codebook"), []).append(f"data.{kind} {s.source.name}")
                vocab = info.get("vocab_size")  # recorded since it was checked; older shards name only the codebook
                # Fewer tokens than the heads predict only where the heads are a checkpoint's (init=).
                if vocab is not None and needs_image_tokens(cfg.objectives, (kind,)) and \
                        (vocab > cfg.model.image.vocab_size or vocab < cfg.model.image.vocab_size and not cfg.init):
                    raise ConfigError(f"{s.source.name} holds image tokens of a {vocab}-token codebook but the "
                                      f"MIM/MMM heads predict image.vocab_size={cfg.model.image.vocab_size}: set "
                                      f"model.image.vocab_size={vocab}, or prepare the data again with a codebook of "
                                      f"{cfg.model.image.vocab_size} tokens")
                if needs_image_tokens(cfg.objectives, (kind,)) and info.get("crops") and \
                        info.get("decoded") != DECODED:
                    # Before DECODED: some crops' tokens are of pixels decoded at 7/8 scale (about 1 % of
                    # the targets of 256-px photographs), or, earlier still, of the image before it was stored.
                    notes.append(f"{s.source.name} was prepared by an earlier flava: some of its image tokens "
                                 "describe slightly other pixels than training shows the model; prepare it again "
                                 "for exact MIM/MMM targets")
                boxes_at = info.get("crop_scale_min")  # recorded since it was said; older shards do not name it
                if info.get("crops") and boxes_at is not None and boxes_at != cfg.data.crop_scale_min:
                    notes.append(f"{s.source.name}: its crops were chosen when it was prepared (--crop-scale-min "
                                 f"{boxes_at:g}): data.crop_scale_min={cfg.data.crop_scale_min:g} does not apply to it")
                grid = int(info.get("grid", -1))
                if grid != cfg.model.image.grid_size:
                    raise ConfigError(f"{s.source.name} was prepared for a {grid}x{grid} patch grid; the model has "
                                      f"{cfg.model.image.grid_size}x{cfg.model.image.grid_size}: prepare the data "
                                      "again for this model (flava prepare with its --config), or train a model of "
                                      "that grid")
        if len(made) > 1:  # without codebook= nothing else compares them: token k means another patch in each
            (a, at), (b, bt) = list(made.items())[:2]
            raise ConfigError(f"{at[0]} and {bt[0]} hold image tokens of different codebooks ({a} and {b}), whose "
                              "ids mean different patches as MIM/MMM targets: prepare them with one codebook "
                              "(flava prepare --codebook CB) or train on one of them")
        self.tokens_from, self._tokens_in = next(iter(made.items()), (None, []))
        return notes

    # The prepared data's codebook, recorded in the checkpoints: a run resumed on data prepared again
    # by another one (a run without codebook= holds none to compare) had trained on without a word.
    tokens_from: str | None = None
    _tokens_in: list[str] = []

    def state_dict(self) -> dict:
        return {"image_tokens_from": self.tokens_from} if self.tokens_from else {}

    def load_state_dict(self, state: dict) -> None:
        was = state.get("image_tokens_from")  # None: trained without prepared tokens, or saved before this
        now, where = self.tokens_from, f"{self._tokens_in[0]} holds" if self.tokens_from else "its data get"
        if now is None and was is not None and self.model.codebook is not None:
            now = self.model.codebook.fingerprint()  # the run's codebook makes the targets now
        if was is not None and now is not None and now != was:
            raise ConfigError(f"the run trained on image tokens of codebook {was}, but {where} those of codebook "
                              f"{now}: prepare the data again with the run's codebook (the one `flava prepare` "
                              "was given), or start a new run from this one (--set init=RUN_FOLDER)")

    def block_stacks(self) -> list[nn.Module]:
        return self.model.model.block_stacks()

    def wrap(self, world: int, device: torch.device) -> nn.Module:
        if world == 1:
            return self.model
        if self.cfg.distributed == "fsdp":
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

            # Blocks, then what holds the rest; FlavaModel itself is not sharded because FSDP
            # cannot shard the scalar logit scale, whose gradient the loop averages itself.
            for m in list(self.model.modules()):
                if isinstance(m, Block):
                    fully_shard(m)
            # Units must be modules whose forward is called (the heads are called one by one);
            # parameter holders without a forward (the sigmoid loss's temperature and bias) stay
            # replicated like the logit scale.
            for m in [*self.model.model.children(), *self.model.heads.children()]:
                if type(m).forward is not torch.nn.Module.forward:
                    fully_shard(m)
            # A pair's two image passes in one call (ImageEncoder.masked_and_whole), gathered as a forward.
            register_fsdp_forward_method(self.model.model.image_encoder, "masked_and_whole")
            return self.model
        # Each step trains one data kind, so every step leaves some parameters unused.
        return data_parallel(self.model, device, find_unused_parameters=True)

    def optimized(self) -> tuple[nn.Module, tuple[str, ...]]:
        # Encoders initialised from unimodal stages may learn more slowly (optim.init_lr_scale).
        scaled = self.cfg.optim.init_lr_scaled
        return self.model, tuple(f"model.{name}_encoder." for name in self.initialised if name in scaled)

    def objective_names(self) -> list[str]:
        return [r.name for r in active(self.cfg.objectives)]

    def shared_parameters(self) -> dict[str, list[nn.Parameter]]:
        # FSDP shards the encoders' parameters: no process holds a whole gradient to measure.
        if self.cfg.distributed == "fsdp" and world().size > 1:
            return {}
        m = self.model.model
        encoders = {"image": m.image_encoder, "text": m.text_encoder, "multimodal": m.multimodal_encoder}
        return {k: [p for p in e.parameters() if p.requires_grad] for k, e in encoders.items()}

    def forward(self, module: nn.Module, batch, generator: torch.Generator, step: int) -> StageOutput:
        out = module(batch, generator)
        return StageOutput(out.losses.total, out.losses.named(), dict(out.metrics))

    chunkable = True

    def forward_chunks(self, module: nn.Module, parts: list, generator: torch.Generator, step: int):
        # Every kind is split (the image and text steps' memory falls alike); GradCache keeps the
        # contrastive loss the whole batch's (objectives.chunks).
        for part, chunk in zip(parts, plan_chunks(self.model, parts, generator)):
            out = module(part, generator, chunk)
            yield StageOutput(out.losses.total, out.losses.named(), dict(out.metrics))

    def after_update(self, step: int, finite: torch.Tensor) -> dict[str, float]:
        # A skipped update left the scale as it was (clamped already): clamping needs no sync.
        self.model.model.clamp_logit_scale()
        return {}
