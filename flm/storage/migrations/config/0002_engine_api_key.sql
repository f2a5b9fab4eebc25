-- The bearer key FLM presents to an engine (set for the managed llama-server, so that only FLM
-- can use it; llama-server would otherwise answer any local web page).
ALTER TABLE engines ADD COLUMN api_key TEXT;
