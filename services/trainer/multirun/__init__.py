"""Training again and again on new data without forgetting: a campaign's job (`campaign`), the
rows each of its runs takes and the checks before it starts (`campaign_plan`), and the SLAO
merge of their adapters (`slao`)."""
