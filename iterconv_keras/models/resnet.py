"""The iterative ResNet: stem, stages of coupled residual blocks, head.

One generic model class; named variants are rows in `iterconv_keras.models.variants`.
The forward pass accepts a *schedule* (which blocks of each stage to run, in
which order), so evaluation can drop, repeat or add iterations of any block.
Training goes through a custom `train_step` that applies soft gradient
coupling (`iterconv_keras.models.coupling`).

Reference: Lippl, Peters & Kriegeskorte, "Can neural networks benefit from
objectives that encourage iterative convergent computations? A case study of
ResNets and object classification", PLoS One 19(3): e0293440, 2024.
"""

import contextvars

import keras
import numpy as np
import tensorflow as tf

from iterconv_keras.models import coupling as coupling_lib
from iterconv_keras.models import cross_replica
from iterconv_keras.models import lipschitz as lipschitz_lib
from iterconv_keras.models._checks import positive_shape
from iterconv_keras.models.blocks import ResidualBlock, make_norm, validate_residual_form

# True while `IterativeResNet.from_config` builds a model whose weights are about to be
# loaded (Keras' load path), so the constructor's initial projection is not run for nothing.
_FROM_CONFIG = contextvars.ContextVar("iterconv_from_config", default=False)


@keras.saving.register_keras_serializable(package="iterconv")
class IterativeResNet(keras.Model):
    """ResNet whose blocks within a stage can be softly coupled.

    Architecture (docs/method.md, "Architecture"): normalisation of the [0, 1] input ->
    stem ``Conv3x3 -> BN -> ReLU`` -> S stages -> head ``BN -> ReLU -> global
    average pooling -> Dense`` (logits). Stage s > 0 begins with an uncoupled
    transition ``BN -> ReLU -> Conv3x3/stride 2`` to its width; stage 0 has none
    when the stem already has its width. Each stage then has T shape-identical
    `ResidualBlock`s, initialised identically (see ``block_init``).

    Args:
        image_shape: tuple ``(H, W, C)`` of the input images (values in [0, 1]).
        num_classes: int, number of output logits.
        stage_widths: tuple of ints, channels of each stage. Default ``(16, 32, 64)``.
        blocks_per_stage: int or tuple of ints (one per stage), the number T of
            residual blocks in each stage. Default 4.
        stem_width: int or None, channels of the stem; None uses the first
            stage's width (and so no transition in stage 0). Default None.
        stem_stride: 1 or 2, stride of the stem convolution (2 for cheap CPU
            variants on 32x32 inputs). Default 1.
        kernel_size: int, kernel size of the block convolutions. Default 3.
        norm: ``"batch"``, ``"sync_batch"`` or ``"none"``: normalisation inside the
            blocks; ``"sync_batch"`` also synchronises the stem, transition and
            head statistics across `tf.distribute` replicas. Default ``"batch"``.
        activation: activation inside the blocks. Default ``"relu"``.
        coupling: float lambda in [0, 1], soft gradient coupling strength.
            0 is an ordinary ResNet, 1 a recurrent one. Default 0.0.
        lipschitz: None (unconstrained, default) or float c > 0: constrain every
            residual function to ``Lip(f) <= c`` at inference by soft spectral
            normalisation of its convolutions and gain-capped batch norm
            (docs/lipschitz.md, ``docs/lipschitz.md``). Stem, transitions and
            head are never constrained. The kernels are projected with many
            power iterations at construction and by a certified bound at the end of
            ``fit``.
        residual_form: ``"plain"`` (``x + g(x)``, default) or ``"contractive"``
            (``(1 - alpha) x + alpha g(x)``, needs ``lipschitz`` < 1: every block
            map is a contraction with constant ``1 - alpha (1 - c)``; method.md
            section 4b, ``docs/lipschitz.md``).
        alpha: None or float in (0, 1], the contractive form's step (None: 0.5);
            the plain form takes none. Default None.
        multi_label: bool, True for independent sigmoid outputs (Digitclutter).
        input_mean: float or per-channel tuple subtracted from the input.
        input_std: float or per-channel tuple the input is divided by.
        block_init: ``"tied"`` (default) copies block 0's initial weights into the
            other blocks of each stage, so every coupling strength starts from
            identical blocks (docs/method.md, "Soft gradient coupling"); ``"independent"`` keeps each
            block's own random initialisation: a conventional ResNet, the baseline
            of the paper's claim about conventionally trained ResNets. Models saved
            before this argument existed load as ``"tied"``.
        **kwargs: standard model arguments (``name``, ``dtype``). ``dtype`` is a
            Keras dtype policy with float32 variables: ``"float32"`` (the global
            default) or a mixed one (``"mixed_bfloat16"``, ``"mixed_float16"``),
            passed on to every layer. Under a mixed policy the stem, transitions and
            blocks compute in 16 bits; input normalisation, batch-norm statistics,
            pooling, the logits, the power iterations and the certificates stay
            float32 (docs/scaling.md, "Precision").

    Example:
        >>> model = IterativeResNet((32, 32, 1), 10, stage_widths=(8, 16),
        ...                         blocks_per_stage=2, coupling=0.9)
        >>> logits = model(images, schedule=[[0, 1, 1], [0]])
    """

    def __init__(
        self,
        image_shape,
        num_classes,
        stage_widths=(16, 32, 64),
        blocks_per_stage=4,
        stem_width=None,
        stem_stride=1,
        kernel_size=3,
        norm="batch",
        activation="relu",
        coupling=0.0,
        lipschitz=None,
        residual_form="plain",
        alpha=None,
        multi_label=False,
        input_mean=0.0,
        input_std=1.0,
        block_init="tied",
        **kwargs,
    ):
        super().__init__(**kwargs)
        policy = _float32_variables(self.dtype_policy)
        self.image_shape = positive_shape(image_shape, "image_shape", ("H", "W", "C"))
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.stage_widths = _positive_ints("stage_widths", stage_widths)
        self.blocks_per_stage = _per_stage_counts(blocks_per_stage, len(self.stage_widths))
        self.stem_width = self.stage_widths[0] if stem_width is None else int(stem_width)
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
        self.stem_stride = stem_stride
        self.kernel_size = kernel_size
        self.norm = norm
        self.activation = activation
        self.coupling = coupling_lib.validate_strength(coupling)
        self.lipschitz = lipschitz_lib.validate_bound(lipschitz)
        self.residual_form, self.alpha = validate_residual_form(residual_form, alpha, self.lipschitz)
        self.multi_label = bool(multi_label)
        self.input_mean = _per_channel("input_mean", input_mean, self.image_shape[-1])
        self.input_std = _per_channel("input_std", input_std, self.image_shape[-1])
        if min(self.input_std) <= 0:
            raise ValueError(f"input_std must be positive, got {input_std!r}")
        if block_init not in ("tied", "independent"):
            raise ValueError(f"block_init must be 'tied' or 'independent', got {block_init!r}")
        self.block_init = block_init

        self.stem_conv = keras.layers.Conv2D(
            self.stem_width, 3, strides=stem_stride, padding="same", use_bias=False,
            kernel_initializer="he_normal", name="stem_conv", dtype=policy,
        )
        self.stem_norm = self._outer_norm("stem_norm")
        self.transitions = [self._make_transition(s) for s in range(len(self.stage_widths))]
        self.stages = [
            [
                ResidualBlock(
                    width, kernel_size=kernel_size, norm=norm, activation=activation,
                    lipschitz=self.lipschitz, residual_form=self.residual_form, alpha=self.alpha,
                    name=f"stage{s}_block{t}", dtype=policy,
                )
                for t in range(count)
            ]
            for s, (width, count) in enumerate(zip(self.stage_widths, self.blocks_per_stage, strict=True))
        ]
        self.head_norm = self._outer_norm("head_norm")
        # float32 logits whatever the policy: a stable loss and float32 serving outputs.
        self.head_dense = keras.layers.Dense(num_classes, name="logits", dtype="float32")
        self._coupling_groups = None

        self.build((None, *self.image_shape))
        # Every lambda starts from identical blocks, so lambda is the only difference
        # between conditions (docs/method.md, "Soft gradient coupling"). Loading a saved model overwrites
        # these values with the saved ones. A conventional ResNet opts out.
        if self.block_init == "tied":
            coupling_lib.tie_blocks(self.stages)
        # Start inside the constraint set (after tying, so blocks stay identical):
        # fresh He-normal kernels are far above the bound, and one power iteration
        # per step would take many steps to catch up from a cold vector. A model
        # built by from_config gets its weights loaded next: the projection waits
        # for fit and is dropped when weights are loaded or set (review D10).
        self._initial_projection_pending = self.lipschitz is not None
        if not _FROM_CONFIG.get():
            self._project_initially()

    def _project_initially(self):
        if self._initial_projection_pending:
            lipschitz_lib.initial_projection(self)
            self._initial_projection_pending = False

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Build from `get_config` without the initial projection (its weights are loaded next).

        Keras' ``load_model`` calls this and then loads the saved weights; the
        projection a constrained model runs at construction would be overwritten
        (it cost about a second per load of ``small``). If no weights are loaded
        or set before ``fit``, ``fit`` runs it first.
        """
        token = _FROM_CONFIG.set(True)
        try:
            return super().from_config(config, custom_objects=custom_objects)
        finally:
            _FROM_CONFIG.reset(token)

    def load_own_variables(self, store):
        # Keras' loaders (load_model, load_weights) call this on the model itself.
        super().load_own_variables(store)
        self._initial_projection_pending = False

    def set_weights(self, weights):
        super().set_weights(weights)
        self._initial_projection_pending = False

    def _outer_norm(self, name):
        # Stem, transitions and head always normalise (they are never iterated);
        # they follow the blocks' choice of synchronisation.
        return make_norm("sync_batch" if self.norm == "sync_batch" else "batch", 0.9, name, dtype=self.dtype_policy)

    def _make_transition(self, s):
        previous = self.stem_width if s == 0 else self.stage_widths[s - 1]
        width = self.stage_widths[s]
        if s == 0 and previous == width:
            return None
        stride = 1 if s == 0 else 2
        transition = keras.Sequential(
            [
                self._outer_norm("norm"),
                keras.layers.Activation("relu", name="act", dtype=self.dtype_policy),
                keras.layers.Conv2D(
                    width, 3, strides=stride, padding="same", use_bias=False,
                    kernel_initializer="he_normal", name="conv", dtype=self.dtype_policy,
                ),
            ],
            name=f"transition{s}",
        )
        # Sequential takes no dtype argument; without the model's policy it would
        # cast 16-bit inputs to float32 only for its first layer to cast them back.
        transition.dtype_policy = self.dtype_policy
        return transition

    def build(self, input_shape):
        # Trace once on a symbolic input so that every sublayer creates its weights.
        self.call(keras.KerasTensor(input_shape))
        self.built = True

    # -- pieces of the forward pass, public because the indices are built from them

    @property
    def num_stages(self):
        return len(self.stages)

    def default_schedule(self):
        """The trained schedule: every block of every stage once, in order."""
        return [list(range(len(blocks))) for blocks in self.stages]

    def embed(self, images, training=None):
        """Normalise ``[0, 1]`` images (in float32, whatever the policy) and apply the stem."""
        mean = np.asarray(self.input_mean, dtype=np.float32)
        std = np.asarray(self.input_std, dtype=np.float32)
        x = (keras.ops.cast(images, "float32") - mean) / std
        h = self.stem_norm(self.stem_conv(x), training=training)
        return keras.ops.relu(h)

    def enter_stage(self, h, stage, training=None):
        """Apply stage ``stage``'s uncoupled transition (identity if it has none)."""
        transition = self.transitions[stage]
        if transition is None:
            return h
        return transition(h, training=training)

    def run_stage(self, h, stage, order=None, training=None):
        """Apply the blocks of ``stage`` listed in ``order`` (default: all, in turn)."""
        blocks = self.stages[stage]
        for t in range(len(blocks)) if order is None else order:
            h = blocks[t](h, training=training)
        return h

    def classify(self, h, training=None):
        """Head: BN -> ReLU -> global average pooling -> Dense logits (pooling and logits in float32)."""
        h = keras.ops.relu(self.head_norm(h, training=training))
        return self.head_dense(keras.ops.mean(keras.ops.cast(h, "float32"), axis=(1, 2)))

    def call(self, inputs, training=None, schedule=None):
        schedule = self.validate_schedule(schedule)
        h = self.embed(inputs, training=training)
        for s in range(self.num_stages):
            h = self.enter_stage(h, s, training=training)
            h = self.run_stage(h, s, schedule[s], training=training)
        return self.classify(h, training=training)

    def forward_intermediates(self, inputs, schedule=None, training=False):
        """Forward pass that also returns every stage input and block output.

        Returns:
            dict with ``logits``, ``stage_inputs`` (list over stages of the tensor
            entering the blocks) and ``block_outputs`` (list over stages of the
            list of tensors after each scheduled block).
        """
        schedule = self.validate_schedule(schedule)
        stage_inputs, block_outputs = [], []
        h = self.embed(inputs, training=training)
        for s in range(self.num_stages):
            h = self.enter_stage(h, s, training=training)
            stage_inputs.append(h)
            outputs = []
            for t in schedule[s]:
                # The model's own run_stage, one block at a time: one forward loop to maintain.
                h = self.run_stage(h, s, [t], training=training)
                outputs.append(h)
            block_outputs.append(outputs)
        return {
            "logits": self.classify(h, training=training),
            "stage_inputs": stage_inputs,
            "block_outputs": block_outputs,
        }

    def validate_schedule(self, schedule):
        """Return ``schedule`` as a list of per-stage index lists, or raise ValueError.

        A schedule lists, for each stage, the block indices to apply in order;
        indices may repeat (extra iterations) or be left out (dropped blocks).
        """
        if schedule is None:
            return self.default_schedule()
        schedule = [list(order) for order in schedule]
        if len(schedule) != self.num_stages:
            raise ValueError(f"schedule needs one entry per stage ({self.num_stages}), got {len(schedule)}")
        for s, order in enumerate(schedule):
            for t in order:
                if not isinstance(t, int) or not 0 <= t < len(self.stages[s]):
                    raise ValueError(
                        f"schedule for stage {s} must hold block indices in "
                        f"[0, {len(self.stages[s]) - 1}], got {order!r}"
                    )
        return schedule

    # -- training

    def train_step(self, data):
        """One optimizer step with soft gradient coupling of the blocks.

        Mirrors Keras' TensorFlow ``train_step``; the only change is that the
        gradients pass through `coupling.couple_gradients` before the optimizer.
        With several `tf.distribute` replicas they are coupled after their sum
        across replicas (`cross_replica.apply_coupled`), so lambda = 1 keeps the
        blocks bitwise identical for any number of replicas. With
        ``coupling == 0`` the step is Keras' own, bitwise.
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            self._track_loss(loss, x)
            loss = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        gradients = tape.gradient(loss, variables)
        if self.coupling and cross_replica.replicas_in_sync() > 1:
            cross_replica.apply_coupled(self.optimizer, gradients, variables, self.coupling_groups(), self.coupling)
        else:
            gradients = coupling_lib.couple_gradients(gradients, self.coupling_groups(), self.coupling)
            self.optimizer.apply(gradients, variables)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`, then, when constrained, the certified projection.

        Training estimates each conv's norm with one power iteration per step
        (from below), so kernels can sit above their bound; `lipschitz.enforce`
        rescales them by a certified upper bound, so the trained (and so the
        saved and exported) weights provably satisfy it.
        """
        self._project_initially()
        if self.lipschitz is not None:
            # Steps compare estimate x certificate ratio with the bound (see
            # `lipschitz.refresh_certificate_ratios`), so the final certified
            # projection changes the trained kernels little.
            lipschitz_lib.refresh_certificate_ratios(self)
            if len(args) > 5:  # callbacks passed positionally (fit's sixth parameter)
                args = (*args[:5], [*(args[5] or []), _CertificateRatios()], *args[6:])
            else:
                kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), _CertificateRatios()]
        history = super().fit(*args, **kwargs)
        if self.lipschitz is not None:
            lipschitz_lib.enforce(self)
        return history

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=False)
        loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
        self._track_loss(loss, x)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _track_loss(self, loss, x):
        # compute_loss divides by the number of replicas under tf.distribute; the
        # reported loss is the per-example mean, as in Keras' own train_step.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss * replicas, sample_weight=tf.shape(x)[0])

    def coupling_groups(self):
        """Groups of indices into ``trainable_variables`` that coupling mixes."""
        if self._coupling_groups is None:
            self._coupling_groups = coupling_lib.coupling_groups(self.stages, self.trainable_variables)
        return self._coupling_groups

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_shape": list(self.image_shape),
                "num_classes": self.num_classes,
                "stage_widths": list(self.stage_widths),
                "blocks_per_stage": list(self.blocks_per_stage),
                "stem_width": self.stem_width,
                "stem_stride": self.stem_stride,
                "kernel_size": self.kernel_size,
                "norm": self.norm,
                "activation": self.activation,
                "coupling": self.coupling,
                "lipschitz": self.lipschitz,
                "residual_form": self.residual_form,
                "alpha": self.alpha,
                "multi_label": self.multi_label,
                "input_mean": list(self.input_mean),
                "input_std": list(self.input_std),
                "block_init": self.block_init,
            }
        )
        return config


def _float32_variables(policy):
    """``policy`` if it keeps variables in float32, else ``ValueError`` naming it.

    Coupling mixes float32 gradients, the Lipschitz constraint and its
    certificates read float32 kernels, and the optimizer's update of a 16-bit
    weight would round small steps away: 16-bit variables are refused.
    """
    if policy.variable_dtype != "float32":
        raise ValueError(
            f"IterativeResNet keeps its variables in float32; dtype policy {policy.name!r} stores them as "
            f"{policy.variable_dtype} (use 'float32', 'mixed_bfloat16' or 'mixed_float16')"
        )
    return policy


def _positive_ints(name, values):
    values = tuple(values)
    if not values or not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")
    return values


def _per_stage_counts(counts, num_stages):
    if isinstance(counts, int):
        counts = (counts,) * num_stages
    counts = _positive_ints("blocks_per_stage", counts)
    if len(counts) != num_stages:
        raise ValueError(f"blocks_per_stage needs {num_stages} entries (one per stage), got {counts!r}")
    return counts


def _per_channel(name, value, channels):
    values = (float(value),) * channels if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if len(values) != channels:
        raise ValueError(f"{name} needs 1 or {channels} values, got {value!r}")
    return values


class _CertificateRatios(keras.callbacks.Callback):
    """Re-measure the certificate ratios of a constrained model after every epoch."""

    def on_epoch_end(self, epoch, logs=None):
        lipschitz_lib.refresh_certificate_ratios(self.model)
