# dsmapper: PGXS build.  See README.md for the test and demo commands.

EXTENSION   = dsmapper
MODULE_big  = dsmapper
OBJS        = $(patsubst %.c,%.o,$(sort $(wildcard src/*.c)))
DATA        = $(wildcard sql/dsmapper--*.sql)
PGFILEDESC  = "dsmapper - map a function over every row of a table"

PG_CPPFLAGS = -I$(srcdir)/src
PG_CFLAGS   = -Wall -Wextra -Werror -Wno-unused-parameter \
              -Wno-missing-field-initializers -Wno-sign-compare -Wno-clobbered

# pg_regress: SQL in test/sql, expected output in expected/ (test/expected
# is a symlink to it), each run in a private temporary instance.
REGRESS      = $(sort $(basename $(notdir $(wildcard test/sql/*.sql))))
REGRESS_OPTS = --inputdir=test --outputdir=test/results \
               --temp-instance=test/tmp_regress \
               --temp-config=test/regress.conf

# -Wno-clobbered: PG_TRY/PG_FINALLY trip it inside the macros themselves;
# variables we change inside PG_TRY are declared volatile by hand.

# isolation specs
ISOLATION      = $(sort $(basename $(notdir $(wildcard test/specs/*.spec))))
ISOLATION_OPTS = --inputdir=test --outputdir=test/output_iso \
                 --temp-instance=test/tmp_isolation \
                 --temp-config=test/isolation.conf

TAP_TESTS   = 1
PROVE_TESTS = test/t/*.pl

EXTRA_CLEAN = test/results test/output_iso test/tmp_regress test/tmp_isolation \
              test/tmp_check test/log

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# Every object depends on the shared header (shared-memory layouts live
# there); PGXS does not track header dependencies by itself.
$(OBJS): src/dsmapper.h
