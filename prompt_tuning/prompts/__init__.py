"""Where prompt values come from: initialisers, prompt banks, SPoT source-prompt transfer and
prompt recycling across models (the prompt layer itself is `prompt_tuning.model.prompt`)."""
