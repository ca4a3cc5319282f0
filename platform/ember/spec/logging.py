"""Logging section: console lines, TensorBoard and the text sample printed at the end."""

from __future__ import annotations

from pydantic import Field

from ember.spec.base import Section


class LoggingSpec(Section):
    log_every: int = Field(10, ge=1, description="Print a line (step, loss, tokens/s) every N steps.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files under the run folder.")
    histograms_every: int = Field(0, ge=0, description="Weight histograms every N steps; 0 disables.")
    sample_prompt: str = Field("def ", description="Prompt of the text sample generated at the end.")
    sample_tokens: int = Field(200, ge=0, description="Tokens to generate at the end; 0 disables.")
    sample_temperature: float = Field(0.8, ge=0, description="Sampling temperature; 0 is greedy.")
    sample_every: int = Field(0, ge=0, description="Image families: a sample grid every N steps (0: at the end only).")
    sample_rows: int = Field(8, ge=0, description="Rows of the sample grid (one column per class); 0 disables.")
