"""Model-level quality of a bundle against its exact source (`fmtconv eval`): KL, top-k agreement, perplexity and
per-layer errors, with both models streamed layer by layer through the runtime's own model class."""

from fmtconv.convert.check.eval.report import EVAL_FILE, EvalReport, read_report, report_text, write_report
from fmtconv.convert.check.eval.run import evaluate, evaluate_direct
from fmtconv.convert.check.eval.tokens import TokenBatch, token_batch

__all__ = ["EVAL_FILE", "EvalReport", "TokenBatch", "evaluate", "evaluate_direct", "read_report", "report_text", "token_batch",
           "write_report"]
