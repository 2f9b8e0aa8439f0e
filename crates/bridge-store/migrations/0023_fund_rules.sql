-- A fund's own criteria as data (`bridge_domain::RuleSet`, a JSON list of
-- tagged rules), taken from its administrator's terms like the rest of
-- them, and the investor attributes those rules read. Both tables keep
-- their history (0022), so a change to a fund's rules or an investor's
-- residence or accreditation is recorded with who made it.
ALTER TABLE funds ADD COLUMN rules jsonb NOT NULL DEFAULT '[]'
    CONSTRAINT fund_rules_are_a_list CHECK (jsonb_typeof(rules) = 'array');
ALTER TABLE investor_accounts
    ADD COLUMN residence_country text CONSTRAINT residence_is_a_country_code CHECK (residence_country ~ '^[A-Z]{2}$'),
    ADD COLUMN accredited boolean NOT NULL DEFAULT false;
-- The simulated fund administrator publishes rules with its terms.
ALTER TABLE sim_funds ADD COLUMN rules jsonb NOT NULL DEFAULT '[]';

-- Adding a column changes every row without firing the history trigger:
-- each row's history records the new columns, so its last entry is again
-- the row as it is (the reconciler checks that).
INSERT INTO model_history (model, key, version, actor, before, after)
SELECT 'investor_accounts', id, version, 'migration 0023',
       to_jsonb(a) - 'residence_country' - 'accredited', to_jsonb(a)
FROM investor_accounts a;
INSERT INTO model_history (model, key, version, actor, before, after)
SELECT 'funds', id, version, 'migration 0023', to_jsonb(f) - 'rules', to_jsonb(f)
FROM funds f;
