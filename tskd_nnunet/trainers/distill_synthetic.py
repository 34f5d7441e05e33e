"""DistillTrainer variants that choose which unlabeled sources are mixed into the batches.

The base DistillTrainer draws from every source of the fold's transfer set (labeled, pool,
``synthetic`` and ``unlabeled`` extension folders). These variants keep a subset, through the
``select_training_cases`` hook, so that the benchmark can compare them:

* ``DistillTrainer_syn``: labeled + synthetic (diffusion) cases only;
* ``DistillTrainer_pool_syn``: labeled + pool + synthetic (the benchmark's ``tskd_syn``: ``tskd``'s transfer set
  plus synthetic cases, so the difference is the synthetic images alone);
* ``DistillTrainer_unl``: labeled + real unlabeled extension cases only;
* ``DistillTrainer_nosyn``: everything except synthetic cases (the ablation).

Supervised loss stays on labeled cases only; the extension cases get the KD loss against the
teacher's output on the same augmented batch (DistillTrainer.train_step). The share of each batch
drawn from non-labeled cases is ``TSKD_UNLABELED_FRACTION`` (DistillTrainer's knob; with
``_syn`` it is exactly the synthetic share). Every epoch logs a running count of the real and
synthetic cases seen since training started in this process.
"""
from __future__ import annotations

from collections import Counter
from typing import List, Tuple

from tskd_nnunet.data.transfer_set import LABELED, POOL, REAL_UNLABELED, SYNTHETIC, TransferSet, TransferSetError
from tskd_nnunet.trainers.distill import DistillTrainer


class DistillTrainerMixedSources(DistillTrainer):
    """DistillTrainer drawing from ``extension_sources`` (+ the pool if ``use_pool``)."""

    extension_sources: Tuple[str, ...] = ("synthetic", "unlabeled")   # extension folder names to keep
    required_sources: Tuple[str, ...] = ()  # extension folders that must hold cases (else the variant is pointless)
    use_pool: bool = True

    def select_training_cases(self, ts: TransferSet) -> TransferSet:
        ts = super().select_training_cases(ts)
        kept = TransferSet(ts.main_folder, list(ts.labeled), list(ts.pool) if self.use_pool else [],
                           {k: v for k, v in ts.extension.items() if k in self.extension_sources})
        missing = [s for s in self.required_sources if s not in kept.extension]
        if missing:
            fix = ("tskd_sample_diffusion" if missing[0] == "synthetic" else "tskd_preprocess_unlabeled")
            raise TransferSetError(
                f"{type(self).__name__} needs {missing[0]} cases, but the fold has no tskd_extension/"
                f"{self.plans_manager.plans_name}_{self.configuration_name}/fold_{self.fold}/{missing[0]} folder "
                f"with cases; create it with {fix} for fold {self.fold}")
        return kept

    def on_train_start(self):
        self._seen: Counter = Counter()
        super().on_train_start()

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        self._seen.update(self._drawn)
        real = sum(self._seen.get(s, 0) for s in (LABELED, POOL, REAL_UNLABELED))
        self.print_to_log_file(
            f"cases seen so far: real {real} (labeled {self._seen.get(LABELED, 0)}, pool {self._seen.get(POOL, 0)}, "
            f"real-unlabeled {self._seen.get(REAL_UNLABELED, 0)}), synthetic {self._seen.get(SYNTHETIC, 0)}")


class DistillTrainer_syn(DistillTrainerMixedSources):
    extension_sources = required_sources = ("synthetic",)
    use_pool = False


class DistillTrainer_pool_syn(DistillTrainerMixedSources):
    extension_sources = required_sources = ("synthetic",)


class DistillTrainer_unl(DistillTrainerMixedSources):
    extension_sources = required_sources = ("unlabeled",)
    use_pool = False


class DistillTrainer_nosyn(DistillTrainerMixedSources):
    extension_sources = ("unlabeled",)
    use_pool = True


class DistillTrainer_syn_test(DistillTrainer_syn):
    schedule = (2, 2, 1)
    teacher_trainer_name = "ViTLoRATeacherTrainer_test"
