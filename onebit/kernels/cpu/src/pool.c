/* A persistent pthread pool: workers spin briefly between jobs (a decode step makes hundreds of small
 * calls), then sleep on a condition variable. Spinning yields the core now and then, so an oversubscribed
 * machine (more runnable threads than cores) degrades gracefully instead of stalling a scheduler tick. Tasks are claimed with a CAS on (generation, next index),
 * so a worker that is late from one job can never take a task of the next. */
#include "ob.h"

#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

struct ob_pool {
    int n;
    pthread_t *th;
    pthread_mutex_t mu, run_mu;
    pthread_cond_t cv;
    _Atomic uint64_t state; /* generation << 32 | next task */
    _Atomic int done;
    _Atomic int sleepers;
    _Atomic int stop;
    int ntasks;
    ob_task_fn fn;
    void *ctx;
    long spin_ns;
    unsigned epoch; /* fork_epoch when the workers were started */
};

typedef struct { ob_pool *p; int id; } worker_arg;

/* After fork() the child has none of the workers: pools created before it run inline there. */
static _Atomic unsigned fork_epoch;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void on_fork_child(void) { atomic_fetch_add(&fork_epoch, 1); }
static void register_atfork(void) { pthread_atfork(NULL, NULL, on_fork_child); }

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Claims and runs tasks of generation gen until none are left. */
static void run_tasks(ob_pool *p, uint32_t gen, int id) {
    for (;;) {
        uint64_t s = atomic_load_explicit(&p->state, memory_order_acquire);
        if ((uint32_t)(s >> 32) != gen) return;
        int ntasks = p->ntasks;
        ob_task_fn fn = p->fn;
        void *ctx = p->ctx;
        uint32_t i = (uint32_t)s;
        if ((int)i >= ntasks) return;
        if (!atomic_compare_exchange_weak_explicit(&p->state, &s, s + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        fn(ctx, (int)i, id);
        atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
    }
}

static void *worker(void *a) {
    ob_pool *p = ((worker_arg *)a)->p;
    int id = ((worker_arg *)a)->id;
    free(a);
    uint32_t seen = 0;
    for (;;) {
        uint32_t gen = (uint32_t)(atomic_load_explicit(&p->state, memory_order_acquire) >> 32);
        if (gen == seen && !atomic_load(&p->stop)) {
            long t0 = now_ns();
            for (int k = 1;; k++) {
                ob_spin_pause(k); /* with a yield now and then: the caller may share our core */
                gen = (uint32_t)(atomic_load_explicit(&p->state, memory_order_acquire) >> 32);
                if (gen != seen || atomic_load(&p->stop)) break;
                if ((k & 255) == 0 && now_ns() - t0 > p->spin_ns) {
                    pthread_mutex_lock(&p->mu);
                    atomic_fetch_add(&p->sleepers, 1);
                    while ((uint32_t)(atomic_load(&p->state) >> 32) == seen && !atomic_load(&p->stop))
                        pthread_cond_wait(&p->cv, &p->mu);
                    atomic_fetch_sub(&p->sleepers, 1);
                    pthread_mutex_unlock(&p->mu);
                    t0 = now_ns();
                }
            }
        }
        if (atomic_load(&p->stop)) return NULL;
        gen = (uint32_t)(atomic_load_explicit(&p->state, memory_order_acquire) >> 32);
        seen = gen;
        run_tasks(p, gen, id);
    }
}

ob_pool *ob_pool_new(int nthreads) {
    ob_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    pthread_once(&atfork_once, register_atfork);
    p->epoch = atomic_load(&fork_epoch);
    p->n = nthreads < 1 ? 1 : nthreads;
    const char *env = getenv("ONEBIT_SPIN_US");
    p->spin_ns = (env ? atol(env) : 300) * 1000L;
    pthread_mutex_init(&p->mu, NULL);
    pthread_mutex_init(&p->run_mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    atomic_init(&p->state, 0);
    p->th = calloc((size_t)p->n, sizeof(pthread_t));
    for (int i = 1; i < p->n; i++) {
        worker_arg *a = malloc(sizeof *a);
        a->p = p;
        a->id = i;
        if (pthread_create(&p->th[i], NULL, worker, a) != 0) {
            free(a);
            p->n = i; /* run with the threads we got */
            break;
        }
    }
    return p;
}

void ob_pool_free(ob_pool *p) {
    if (!p) return;
    if (p->epoch != atomic_load(&fork_epoch)) { /* forked child: the workers are not ours to join */
        free(p->th);
        free(p);
        return;
    }
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->th[i], NULL);
    free(p->th);
    free(p);
}

int ob_pool_threads(const ob_pool *p) { return p->n; }

void ob_pool_run(ob_pool *p, ob_task_fn fn, void *ctx, int ntasks) {
    if (ntasks <= 0) return;
    if (p->n == 1 || ntasks == 1 || p->epoch != atomic_load_explicit(&fork_epoch, memory_order_relaxed)) {
        for (int i = 0; i < ntasks; i++) fn(ctx, i, 0);
        return;
    }
    pthread_mutex_lock(&p->run_mu);
    p->fn = fn;
    p->ctx = ctx;
    p->ntasks = ntasks;
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    uint32_t gen = (uint32_t)(atomic_load(&p->state) >> 32) + 1;
    atomic_store(&p->state, (uint64_t)gen << 32); /* seq_cst: pairs with the sleepers check */
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    run_tasks(p, gen, 0);
    /* wait for tasks still running elsewhere; yield now and then in case their thread waits for our core */
    for (int k = 1; atomic_load_explicit(&p->done, memory_order_acquire) < ntasks; k++) ob_spin_pause(k);
    pthread_mutex_unlock(&p->run_mu);
}
