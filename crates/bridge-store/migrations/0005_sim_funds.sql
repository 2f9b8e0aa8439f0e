-- The simulated fund administrator's own record of each fund's terms, which
-- Bridge reads through the Fund Account Service.
CREATE TABLE sim_funds (
    id                        text PRIMARY KEY,
    currency                  char(3) NOT NULL,
    minimum_investment_minor  bigint NOT NULL,
    seats_max                 integer NOT NULL,
    capacity_minor            bigint NOT NULL
);
