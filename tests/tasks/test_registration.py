"""What `tasks.*` registers: names, counts, features, task indices and class labels."""
import importlib

import pytest
import seqio
import tensorflow_datasets as tfds

import tasks
import tasks.all
from prompt_tuning.data import registry
from prompt_tuning.data import vocabularies
import tasks.glue as glue
import tasks.glue_transfer as glue_transfer
import tasks.qa as qa
import tasks.super_glue as super_glue

VARIANTS = 3 * 2 * 3  # formats x (plain, _examples) x vocabularies


FAMILIES = {"glue": glue, "super_glue": super_glue, "transfer": glue_transfer, "qa": qa}


def test_task_and_mixture_counts_by_family():
  tasks_by_family = {f: len(m.TASK_NAMES) for f, m in FAMILIES.items()}
  assert tasks_by_family == {
      "glue": 12 * VARIANTS,
      # 9 datasets, WSC eval and DPR in every variant; WSC train has no `_examples` variant.
      "super_glue": 11 * VARIANTS + 3 * 3,
      "transfer": 2 * VARIANTS,
      "qa": 13 * 2 * 3,  # SQuAD + 12 MRQA sets, plain format only
  }
  mixtures_by_family = {f: len(m.MIXTURE_NAMES) for f, m in FAMILIES.items()}
  # super_glue: + the original's 2 names for task-index `_examples` mixtures.
  assert mixtures_by_family == {"glue": 2 * VARIANTS, "super_glue": 4 * VARIANTS + 2,
                                "transfer": 2 * VARIANTS, "qa": 8 * 2 * 3}
  all_tasks = [n for m in FAMILIES.values() for n in m.TASK_NAMES]
  all_mixtures = [n for m in FAMILIES.values() for n in m.MIXTURE_NAMES]
  assert len(set(all_tasks)) == len(all_tasks) == 537
  assert len(set(all_mixtures)) == len(all_mixtures) == 194
  assert set(all_tasks) <= set(seqio.TaskRegistry.names())
  assert set(all_mixtures) <= set(seqio.MixtureRegistry.names())


def test_original_names_exist():
  for name in ["taskless_glue_sst2_v200_examples", "glue_sst2_v200", "task_index_glue_rte_v200",
               "glue_mnli_matched_v200_mt5", "taskless_super_glue_boolq_v102_byt5",
               "super_glue_wsc_v102_simple_train", "taskless_super_glue_wsc_v102_simple_eval",
               "glue_mrpc_from_qqp_v200", "taskless_glue_qqp_from_mrpc_v200_examples",
               "squad_v010_allanswers_examples", "mrqa_textbookqa_v100", "mrqa_bioasq_v100_mt5",
               "dpr_v001_simple", "taskless_dpr_v001_simple_examples",
               "task_index_dpr_v001_simple_examples_mt5"]:
    assert name in seqio.TaskRegistry.names(), name
  for name in ["taskless_glue_mnli_and_dev_v200", "task_index_super_glue_v102_proportional",
               "taskless_super_glue_wsc_and_dev_v102_simple_examples",
               "taskless_glue_mrpc_from_qqp_zeroshot_v200", "squad_to_mrqa", "squad_to_drop_byt5",
               "glue_v200_proportional", "wsc_dpr_simple_proportional",
               "task_index_super_glue_v102_examples_proportional",
               "task_index_super_glue_with_dpr_v102_examples_proportional"]:
    assert name in seqio.MixtureRegistry.names(), name


def test_every_task_has_t5_output_features():
  expected = {"": vocabularies.t5_vocabulary(), "_mt5": vocabularies.mt5_vocabulary(),
              "_byt5": vocabularies.byt5_vocabulary()}
  for name in tasks.all.TASK_NAMES:
    features = seqio.get_mixture_or_task(name).output_features
    assert set(features) == {"inputs", "targets"}, name
    assert all(f.add_eos and f.required for f in features.values()), name
    suffix = next((s for s in ("_mt5", "_byt5") if name.endswith(s)), "")
    assert features["inputs"].vocabulary is expected[suffix], name


def test_importing_again_is_a_no_op():
  before = (set(seqio.TaskRegistry.names()), set(seqio.MixtureRegistry.names()))
  for module in FAMILIES.values():
    names = (module.TASK_NAMES, module.MIXTURE_NAMES)
    importlib.reload(module)
    assert (module.TASK_NAMES, module.MIXTURE_NAMES) == names
    assert module.register() == names
  assert (set(seqio.TaskRegistry.names()), set(seqio.MixtureRegistry.names())) == before


def test_task_indices_follow_the_original():
  # Sorted names; diagnostics and MNLI dev sets share MNLI's / RTE's index.
  assert glue.TASK_INDEX == {"cola": 0, "mnli": 1, "mrpc": 2, "qnli": 3, "qqp": 4, "rte": 5,
                             "sst2": 6, "stsb": 7, "wnli": 8, "ax": 1, "mnli_matched": 1,
                             "mnli_mismatched": 1}
  assert super_glue.TASK_INDEX == {"boolq": 0, "cb": 1, "copa": 2, "multirc": 3, "record": 4,
                                   "rte": 5, "wic": 6, "wsc": 7, "axb": 5, "axg": 5}
  with pytest.raises(ValueError, match="not a task"):
    registry.task_index_mapping(["a"], {"b": "c"})


def test_class_labels():
  assert tasks.class_labels("glue_sst2") == ("negative", "positive")
  assert tasks.class_labels("glue_rte") == ("entailment", "not_entailment")
  assert tasks.class_labels("glue_mrpc") == ("not_equivalent", "equivalent")
  assert tasks.class_labels("taskless_glue_sst2_v200_examples_mt5") == ("negative", "positive")
  assert tasks.class_labels("super_glue_cb") == ("entailment", "contradiction", "neutral")
  # Free-text tasks use the paper's words.
  assert tasks.class_labels("taskless_super_glue_record_v102") == (
      "commonsense", "reasoning", "reading", "comprehension")
  assert tasks.class_labels("taskless_super_glue_wsc_and_dev_v102_simple") == (
      "commonsense", "pronoun", "resolution")
  # DPR is WSC's task in WSC's format.
  for name in ("dpr", "taskless_dpr_v001_simple", "wsc_dpr_simple_proportional"):
    assert tasks.class_labels(name) == ("commonsense", "pronoun", "resolution"), name
  # Zero-shot transfer: the prompt learns the source's words.
  assert tasks.class_labels("glue_mrpc_from_qqp_zeroshot_v200") == ("not_duplicate", "duplicate")
  assert tasks.class_labels("squad_to_mrqa") == ()
  # A mixture without labels of its own collects its tasks' labels.
  mixed = tasks.class_labels("glue_v200_proportional")
  assert {"acceptable", "positive", "duplicate", "entailment"} <= set(mixed)
  assert len(mixed) == len(set(mixed))
  with pytest.raises(KeyError, match="no class labels"):
    tasks.class_labels("no_such_task")


def test_class_labels_match_tfds_label_order():
  """The postprocessor maps a label word to its index: the order must be TFDS's."""
  for name, labels in glue.LABELS.items():
    if name != "stsb":
      assert labels == tuple(tfds.builder_cls("glue").builder_configs[name].label_classes), name
  for name, labels in super_glue.LABELS.items():
    if name not in ("record", "wsc"):
      config = tfds.builder_cls("super_glue").builder_configs[name]
      assert labels == tuple(config.label_classes), name


def test_glue_feature_order_is_t5s_sorted_order():
  for name, features in glue.FEATURES.items():
    assert list(features) == sorted(features), name
  for name, features in super_glue.FEATURES.items():
    if name not in ("multirc", "wic"):  # T5 fixes these two orders explicitly
      assert list(features) == sorted(features), name


def test_variant_names():
  assert registry.variant_name("glue_sst2_v200", "taskless", True, "mt5") == (
      "taskless_glue_sst2_v200_examples_mt5")
  assert registry.variant_name("glue_sst2_v200") == "glue_sst2_v200"
